"""The hashed train step's thread CPU time by Python function (cProfile with time.thread_time
as its clock; cumulative time of the hash-table functions a step), the mc preset's batches.

    python funcs.py [rounds]
"""

import cProfile
import pstats
import sys
import time

import torch

from jaggedrec import optim
from jaggedrec.benchmarks.providers import mc
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

torch.set_num_threads(1)
args = mc._parser().parse_args(["--module", "mc"])
w = mc._workload(args)
torch.manual_seed(0)
_, batches = mc._batches(w, 4, 0, "cpu")
options = {f"t{t}": HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(w["tables"])}
hashed = HashEmbeddingBagCollection(mc._configs(w), options, backend="torch", fused_optimizer=optim.RowWiseAdagrad(lr=0.01))
for _ in range(3):
    for raw, _ in batches:
        hashed(raw).values().sum().backward()
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
prof = cProfile.Profile(time.thread_time)
prof.enable()
for _ in range(rounds):
    for raw, _ in batches:
        hashed(raw).values().sum().backward()
prof.disable()
steps = rounds * len(batches)
stats = pstats.Stats(prof)
rows = []
for (path, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
    if "hash" in path or name in ("backward", "forward", "_reset_evicted", "remap"):
        rows.append((ct / steps * 1e3, tt / steps * 1e3, nc / steps, f"{path.split('jaggedrec/')[-1]}:{name}"))
print(f"ms a step (cumulative, own), calls a step; {steps} steps")
for ct, tt, nc, where in sorted(rows, reverse=True)[:30]:
    print(f"{ct:8.3f} {tt:8.3f} {nc:6.1f}  {where}")
