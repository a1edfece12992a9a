"""Before/after table of two --workloads JSON readings per Triton (markdown)."""
import json, sys
def load(p): return json.load(open(p))
pairs = [("3.6", sys.argv[1], sys.argv[2]), ("3.9", sys.argv[3], sys.argv[4])]
print("| workload | variant | triton | regs before -> after | round trips before -> after | loop spills before -> after |")
print("|---|---|---|---|---|---|")
for tri, b, a in pairs:
    B, A = load(b), load(a)
    for w in B:
        ra = {(r["kernel"], r["label"]): r for r in A[w]}
        for r in B[w]:
            n = ra.get((r["kernel"], r["label"]))
            if n is None: continue
            wl = w.split(" --kernels")[0]
            name = f'{r["kernel"]} {r["label"].replace(" BLOCK_B=32", "").replace(" PROGRAMS_PER_SM=2", "").replace(" warps=4", "")}'
            mark = " **" if (n["round_trips"] != r["round_trips"]) else ""
            print(f'| {wl} | {name} | {tri} | {r["registers"]} -> {n["registers"]} | {r["round_trips"]:g} -> {n["round_trips"]:g}{mark} | {r["loop_spills"]} -> {n["loop_spills"]} |')
