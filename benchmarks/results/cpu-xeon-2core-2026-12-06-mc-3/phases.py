"""Where the hashed train step's thread CPU time goes, by phase (one process, the mc preset's
batches, 4 cycled): HashTableState.remap (probe, place, evict, counts), the evicted rows'
reset, the rest of the forward (the bag collection over the rows) and the backward with the
fused update; the static step (ids modulo the rows) and the static step fed the same rows
alternate with it. Medians over rounds.

    python phases.py [rounds]
"""

import statistics
import sys
import time

import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.benchmarks.providers import mc
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

torch.set_num_threads(1)
args = mc._parser().parse_args(["--module", "mc"])
w = mc._workload(args)
torch.manual_seed(0)
_, batches = mc._batches(w, 4, 0, "cpu")
options = {f"t{t}": HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(w["tables"])}
fused = optim.RowWiseAdagrad(lr=0.01)
hashed = HashEmbeddingBagCollection(mc._configs(w), options, backend="torch", fused_optimizer=fused)
static = jr.EmbeddingBagCollection(mc._configs(w), backend="torch", fused_optimizer=fused)
same = mc._same_rows(w, args, "cpu", batches)
T = {}


def timed(name, f):
    def g(*a, **k):
        t0 = time.thread_time()
        out = f(*a, **k)
        T.setdefault(name, []).append((time.thread_time() - t0) * 1e3)
        return out
    return g


state = hashed.hash_state
state.remap = timed("remap", state.remap)
hashed._reset_evicted = timed("reset", hashed._reset_evicted)


def hashed_step(b):
    t0 = time.thread_time()
    out = hashed(batches[b][0])
    t1 = time.thread_time()
    out.values().sum().backward()
    t2 = time.thread_time()
    return t1 - t0, t2 - t1


for _ in range(2):
    for b in range(4):
        hashed_step(b)
        static(batches[b][1]).values().sum().backward()
        static(same[b]).values().sum().backward()
T.clear()
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    for b in range(4):
        t0 = time.thread_time()
        fwd, bwd = hashed_step(b)
        T.setdefault("train_hash", []).append((time.thread_time() - t0) * 1e3)
        T.setdefault("hash forward", []).append(fwd * 1e3)
        T.setdefault("hash backward", []).append(bwd * 1e3)
        for name, kjt in (("train_static", batches[b][1]), ("train_static_same_rows", same[b])):
            t0 = time.thread_time()
            out = static(kjt)
            t1 = time.thread_time()
            out.values().sum().backward()
            t2 = time.thread_time()
            T.setdefault(name, []).append((t2 - t0) * 1e3)
            T.setdefault(f"{name} forward", []).append((t1 - t0) * 1e3)
            T.setdefault(f"{name} backward", []).append((t2 - t1) * 1e3)
m = {k: statistics.median(v) for k, v in T.items()}
for k, v in m.items():
    print(f"{k:24s} {v:8.3f} ms")
print(f"hashed / static {m['train_hash'] / m['train_static']:.3f}x, hashed / same rows "
      f"{m['train_hash'] / m['train_static_same_rows']:.3f}x")
