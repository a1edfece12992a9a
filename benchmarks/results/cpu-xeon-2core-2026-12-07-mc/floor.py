"""One process, thread CPU time, the providers alternating within each round (the order flips
every round), medians over rounds of the mc preset's 4 batches, one thread:

- ``train_hash``: the hashed collection's train step (RowWiseAdagrad fused, LRU, buckets of 8);
- ``train_static``: the same tables static, fed the ids modulo the rows;
- ``train_static_same_rows``: the static tables fed the rows the hashed tables read;
- ``remap_floor``: the fewest torch ops any eager remap of these ids runs on this state layout,
  without placing a new id: the fixed hash and bucket of every id, one tag word and one key
  gathered an id (the tag's slot stood in by the word's low bits), the LRU stamp scattered,
  the rows formed; on the floor's own copy of the state;
- ``reset_floor``: the writes an eviction cannot avoid, for as many rows as the hashed step
  evicted in the same batch: fresh values drawn (torch's generator, ``uniform_``: cheaper than
  the counter-based draw the collection uses so that eager, compiled and compacted steps agree)
  and written into the evicted rows, their row-wise optimizer state zeroed;
- ``place_floor``: the least placement of the ids the hashed step placed in that batch (its
  evicting positions' ids): one sort by bucket, each bucket's LRU stamps gathered and the
  oldest slot taken (no ranking of several new ids in one bucket), the keys, tags and stamps
  written.

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
from jaggedrec.ops import hash_place_torch as place
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
num_buckets = (w["num_embeddings"] - 1) // 8
evictions = {}  # batch -> evictions of the hashed step's last run of it
train_step = place.train_step


def counted(*a, **k):
    out = train_step(*a, **k)
    counted.last = out.evicted_slot.numel()
    ids, buckets = a[6], a[7]  # train_step(keys, last_step, count, sketch, step, bucket_size, ids, buckets, ...)
    counted.placed = (ids.index_select(0, out.evicted_at), buckets.index_select(0, out.evicted_at))
    return out


place.train_step = counted
copies = {}  # the floors' own state, so that they never write the hashed tables'
dim = w["dim"]
spare_weight = torch.empty(w["tables"] * w["num_embeddings"], dim).uniform_(-0.1, 0.1)
spare_state = torch.zeros(w["tables"] * w["num_embeddings"])


def remap_floor(b):
    kjt = batches[b][0]
    raw = kjt.values()
    table = torch.repeat_interleave(torch.arange(w["tables"]), torch.tensor(kjt.length_per_key()))
    h = hp.mix(raw)
    buckets = hp.bucket_of(h, table * num_buckets, num_buckets)
    tags, keys, last_step, step = (copies[k] for k in ("tags", "keys", "last_step", "step"))
    words = tags.narrow(0, 0, tags.numel() - 1).view(torch.int64)
    word = words.index_select(0, buckets)  # the bucket's tags
    slot = buckets * 8 + (word & 7)  # a stand-in for the slot the tags name
    found = keys.index_select(0, slot) == raw
    last_step.put_(slot, step.expand(raw.numel()))
    return torch.where(found, slot - table * num_buckets * 8, 99_999)


def reset_floor(b):
    e = evictions.get(b, 0)
    rows = torch.randint(0, spare_state.numel(), (e,), generator=torch.Generator().manual_seed(b))
    spare_weight.index_copy_(0, rows, torch.empty(e, dim).uniform_(-0.1, 0.1))
    spare_state.index_fill_(0, rows, 0.0)


placed = {}  # batch -> (ids, buckets) the hashed step's last run of it placed with an eviction


def place_floor(b):
    ids, buckets = placed.get(b, (torch.zeros(0, dtype=torch.int64),) * 2)
    keys, tags, last_step, step = (copies[k] for k in ("keys", "tags", "last_step", "step"))
    order = torch.sort(buckets).indices
    ids, buckets = ids.index_select(0, order), buckets.index_select(0, order)
    stamps = last_step.narrow(0, 0, last_step.numel() - 1).view(-1, 8).index_select(0, buckets)
    slot = stamps.argmin(1).add_(buckets, alpha=8)
    keys.put_(slot, ids)
    tags.put_(slot, hp.tag_of(hp.mix(ids)).to(torch.uint8))
    last_step.put_(slot, step.expand(ids.numel()))


def train_hash(b):
    hashed(batches[b][0]).values().sum().backward()
    evictions[b] = counted.last
    placed[b] = counted.placed


F = {"train_hash": train_hash,
     "train_static": lambda b: static(batches[b][1]).values().sum().backward(),
     "train_static_same_rows": lambda b: static(same[b]).values().sum().backward(),
     "remap_floor": remap_floor, "reset_floor": reset_floor, "place_floor": place_floor}
copies.update({k: getattr(hashed.hash_state, k).clone() for k in ("tags", "keys", "last_step", "step")})
for _ in range(3):
    for b in range(4):
        for f in F.values():
            f(b)
copies.update({k: getattr(hashed.hash_state, k).clone() for k in ("tags", "keys", "last_step", "step")})
T = {n: [] for n in F}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for r in range(rounds):
    for b in range(4):
        for name, f in (F.items() if r % 2 == 0 else reversed(F.items())):
            t0 = time.thread_time()
            f(b)
            T[name].append((time.thread_time() - t0) * 1e3)
m = {k: statistics.median(v) for k, v in T.items()}
for k, v in m.items():
    print(f"{k:24s} {v:8.3f} ms")
print(f"evictions a batch: {sorted(evictions.values())}")
floor = m["remap_floor"] + m["reset_floor"] + m["place_floor"]
print(f"hashed / static {m['train_hash'] / m['train_static']:.3f}x, hashed / static same rows "
      f"{m['train_hash'] / m['train_static_same_rows']:.3f}x")
print(f"floor (remap + reset + place floors {floor:.3f} ms): (static same rows + floor) / static "
      f"{(m['train_static_same_rows'] + floor) / m['train_static']:.3f}x, (static + floor) / static "
      f"{(m['train_static'] + floor) / m['train_static']:.3f}x")
