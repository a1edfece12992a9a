"""Readings of a --workloads JSON as lines: workload, kernel, label, regs, trips, loop spills, row load bytes."""
import json, sys
for w, rows in json.load(open(sys.argv[1])).items():
    wl = w.split(" --kernels")[0]
    for r in rows:
        if len(sys.argv) > 2 and r["kernel"] not in sys.argv[2].split(","):
            continue
        print(f'{wl:45s} {r["kernel"]:16s} {r["label"]:60s} regs={r["registers"]:3d} trips={r["round_trips"]:g} '
              f'spills={r["loop_spills"]}/{r["outer_loop_spills"]} stack={r["stack_bytes"]} ld={r["row_load_bytes"]}')
