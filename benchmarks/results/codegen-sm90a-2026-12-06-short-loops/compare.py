"""Before/after table (markdown) of --workloads JSON readings per Triton:
compare.py BEFORE36 AFTER36 BEFORE39 AFTER39. A variant read only after (a config newly launched) or
only before (one no longer launched) shows with "-" on the other side."""
import json
import sys


def load(path):
    return {w.split(" --kernels")[0]: {(r["kernel"], r["label"]): r for r in rows}
            for w, rows in json.load(open(path)).items()}


def cell(r, key, fmt="{}"):
    return "-" if r is None else fmt.format(r[key])


print("| workload | kernel | variant | triton | regs | round trips | loop spills | row load B |")
print("|---|---|---|---|---|---|---|---|")
for tri, b, a in (("3.6", sys.argv[1], sys.argv[2]), ("3.9", sys.argv[3], sys.argv[4])):
    B, A = load(b), load(a)
    for w in A:
        keys = list(B.get(w, {})) + [k for k in A[w] if k not in B.get(w, {})]
        for k in keys:
            if k[0] not in {kk for kk, _ in B.get(w, {})}:
                continue  # a kernel the before file did not read
            rb, ra = B[w].get(k), A[w].get(k)
            trips = f'{cell(rb, "round_trips", "{:g}")} -> {cell(ra, "round_trips", "{:g}")}'
            if rb and ra and rb["round_trips"] != ra["round_trips"]:
                trips = f"**{trips}**"
            label = k[1].replace("HAS_INVERSE=False ", "").replace("HAS_PSW=False ", "").replace("HAS_PSW=True ", "")
            print(f"| {w} | {k[0]} | {label} | {tri} | {cell(rb, 'registers')} -> {cell(ra, 'registers')} | {trips} | "
                  f"{cell(rb, 'loop_spills')} -> {cell(ra, 'loop_spills')} | "
                  f"{cell(rb, 'row_load_bytes')} -> {cell(ra, 'row_load_bytes')} |")
