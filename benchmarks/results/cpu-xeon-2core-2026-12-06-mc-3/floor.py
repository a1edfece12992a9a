"""One process, thread CPU time, providers alternating within each round, medians (the mc
preset's batches): the hashed train step, the static step fed the ids modulo the rows, the
static step fed the rows the hashed tables read, and the *floor*: the fewest torch ops any
eager remap of these ids runs (the fixed hash and bucket, one word and one key gathered an
id, the LRU stamp scattered, the rows formed), without placing, evicting or counting.

    python floor.py [rounds]
"""

import statistics
import sys
import time

import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.benchmarks.providers import mc
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.ops import hash_probe_torch as hp

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
copies = {}  # the floor's own copy of the state (after the warm-up): it must not stamp the hashed tables'
num_buckets = (w["num_embeddings"] - 1) // 8


def floor(b):
    raw = batches[b][0].values()
    table = torch.repeat_interleave(torch.arange(w["tables"]), torch.tensor(batches[b][0].length_per_key()))
    h = hp.mix(raw)
    buckets = hp.bucket_of(h, table * num_buckets, num_buckets)
    tags, keys, last_step, step = (copies.get(k, getattr(hashed.hash_state, k)) for k in ("tags", "keys", "last_step", "step"))
    words = tags.narrow(0, 0, tags.numel() - 1).view(torch.int64)
    word = words.index_select(0, buckets)  # the bucket's tags
    slot = buckets * 8 + (word & 7)  # a stand-in for the slot the tags name
    found = keys.index_select(0, slot) == raw
    last_step.index_copy_(0, slot, step.expand(raw.numel()))
    return torch.where(found, slot - table * num_buckets * 8, 99_999)


F = {"train_hash": lambda b: hashed(batches[b][0]).values().sum().backward(),
     "train_static": lambda b: static(batches[b][1]).values().sum().backward(),
     "train_static_same_rows": lambda b: static(same[b]).values().sum().backward(),
     "remap_floor": floor}
copies.update({k: getattr(hashed.hash_state, k).clone() for k in ("tags", "keys", "last_step", "step")})
for _ in range(2):
    for b in range(4):
        for f in F.values():
            f(b)
copies.update({k: getattr(hashed.hash_state, k).clone() for k in ("tags", "keys", "last_step", "step")})
T = {n: [] for n in F}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    for b in range(4):
        for name, f in F.items():
            t0 = time.thread_time()
            f(b)
            T[name].append((time.thread_time() - t0) * 1e3)
m = {k: statistics.median(v) for k, v in T.items()}
for k, v in m.items():
    print(f"{k:24s} {v:8.3f} ms")
print(f"hashed / static {m['train_hash'] / m['train_static']:.3f}x, hashed / static same rows "
      f"{m['train_hash'] / m['train_static_same_rows']:.3f}x")
print(f"floor: (static same rows + remap floor) / static {(m['train_static_same_rows'] + m['remap_floor']) / m['train_static']:.3f}x,"
      f" (static + remap floor) / static {(m['train_static'] + m['remap_floor']) / m['train_static']:.3f}x")
