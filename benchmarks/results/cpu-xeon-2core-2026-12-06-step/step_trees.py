"""A/B of jaggedrec trees against FBGEMM, one process per tree, processes alternating.

step_ab.py's --before imports a second copy of the package into the same process, but the
ops are registered under one global name (torch.library), so both copies ran the same code.
Here each run of step_ab.py imports one tree (PYTHONPATH) beside FBGEMM; the trees alternate
run by run, and the per-run ratio FBGEMM / jaggedrec (same process, same minutes) is what to
compare between trees.

    python step_trees.py L THREADS REPS OPTIMIZER ROUNDS TREE [TREE ...] [-- step_ab options]

Prints every run, then per tree the median jaggedrec and FBGEMM times and ratios.
"""
import os
import re
import statistics
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
argv = sys.argv[1:]
extra = []
if "--" in argv:
    extra = argv[argv.index("--") + 1:]
    argv = argv[:argv.index("--")]
L, threads, reps, optimizer, rounds, *trees = argv
runs = {t: [] for t in trees}
for r in range(int(rounds)):
    order = trees if r % 2 == 0 else trees[::-1]
    for tree in order:
        env = dict(os.environ, PYTHONPATH=tree)
        out = subprocess.run([sys.executable, os.path.join(here, "step_ab.py"), L, threads, reps, optimizer, *extra],
                             env=env, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            m = re.search(r"\(load ([\d.]+).*jaggedrec ([\d.]+) ms, fbgemm ([\d.]+) ms", line)
            if m:
                load, ours, fb = (float(x) for x in m.groups())
                runs[tree].append((ours, fb, load, "contended" in line))
                print(f"{tree}: {line}", flush=True)
for tree, rs in runs.items():
    for contended in sorted({c for *_, c in rs}):
        sel = [x for x in rs if x[3] == contended]
        print(f"{tree} {'contended' if contended else 'quiet'}: jaggedrec {statistics.median(x[0] for x in sel):.1f} ms, "
              f"fbgemm {statistics.median(x[1] for x in sel):.1f} ms, median fbgemm/jaggedrec "
              f"{statistics.median(x[1] / x[0] for x in sel):.2f} over {len(sel)} runs "
              f"(load {min(x[2] for x in sel):.1f}-{max(x[2] for x in sel):.1f})")
