"""Issue 26: the hash-table collection's train step compiled (Inductor, CPU, fullgraph) against
eager and the same tables static, with the hash-table code before this change (OLD: a git
worktree's files, loaded under other module names) and after it, in one process.

Usage: mc_compiled_ab.py OLD_TREE [rounds]   (OLD_TREE: a checkout of the commit before)
One thread; thread CPU time per step (forward, backward with the fused RowWiseAdagrad step);
the five models run alternately, round after round; medians. Both hashed compiled models must
keep the eager hashed model's keys (asserted every round).
"""
import statistics
import sys
import time
import types

import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.benchmarks.providers import mc
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

torch.set_num_threads(1)
OLD_TREE = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 40


def load_old():
    """The old hash-table files as modules ``old_*`` importing one another (the rest is today's)."""
    files = [("hash_probe_torch", "jaggedrec/ops/hash_probe_torch.py"),
             ("hash_place_torch", "jaggedrec/ops/hash_place_torch.py"),
             ("hash_table", "jaggedrec/modules/hash_table.py"),
             ("hash_embedding_modules", "jaggedrec/modules/hash_embedding_modules.py")]
    out = {}
    for name, path in files:
        src = open(f"{OLD_TREE}/{path}").read()
        src = src.replace("from jaggedrec.ops import hash_probe_torch as hp", "import old_hash_probe_torch as hp")
        src = src.replace("from jaggedrec.ops.hash_probe_torch import", "from old_hash_probe_torch import")
        src = src.replace("from jaggedrec.ops import hash_place_torch as place", "import old_hash_place_torch as place")
        src = src.replace("from jaggedrec.modules.hash_table import", "from old_hash_table import")
        module = types.ModuleType(f"old_{name}")
        module.__file__ = f"{OLD_TREE}/{path}"
        sys.modules[f"old_{name}"] = module
        exec(compile(src, module.__file__, "exec"), module.__dict__)
        out[name] = module
    return out


old = load_old()
w = dict(tables=4, num_embeddings=100000, dim=64, batch_size=2048, pooling_factor=8, id_space=10.0)
keys, batches = mc._batches(w, 4, 0, "cpu")
fused = optim.RowWiseAdagrad(lr=0.01)


def hashed_model(cls, options_cls):
    torch.manual_seed(0)
    opts = {f"t{t}": options_cls(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(4)}
    return cls(mc._configs(w), opts, backend="torch", fused_optimizer=fused)


new_h = hashed_model(HashEmbeddingBagCollection, HashTableOptions)
old_h = hashed_model(old["hash_embedding_modules"].HashEmbeddingBagCollection, old["hash_table"].HashTableOptions)
eager_h = hashed_model(HashEmbeddingBagCollection, HashTableOptions)
static_e = jr.EmbeddingBagCollection(mc._configs(w), backend="torch", fused_optimizer=fused)
static_c = jr.EmbeddingBagCollection(mc._configs(w), backend="torch", fused_optimizer=fused)
models = {"hashed compiled new": torch.compile(new_h, fullgraph=True),
          "hashed compiled old": torch.compile(old_h, fullgraph=True),
          "static compiled": torch.compile(static_c, fullgraph=True),
          "hashed eager": eager_h, "static eager": static_e}
hashed = {"hashed compiled new", "hashed compiled old", "hashed eager"}


def step(m, k):
    m(k).values().sum().backward()


t0 = time.time()
for r in range(8):
    for name, m in models.items():
        step(m, batches[r % 4][0 if name in hashed else 1])
print(f"warm-up and compile: {time.time() - t0:.0f} s", flush=True)
times = {name: [] for name in models}
for r in range(ROUNDS):
    raw, st = batches[r % 4]
    for name, m in models.items():
        t = time.thread_time()
        step(m, raw if name in hashed else st)
        times[name].append(time.thread_time() - t)
    assert torch.equal(new_h.hash_state.keys, eager_h.hash_state.keys), r
    assert torch.equal(old_h.hash_state.keys, eager_h.hash_state.keys), r
med = {name: statistics.median(v) * 1000 for name, v in times.items()}
print(f"torch {torch.__version__}, one thread, {ROUNDS} rounds, thread CPU ms per step (median):")
for name, v in med.items():
    print(f"  {name:22s} {v:8.2f}")
print(f"compiled hashed/static: old {med['hashed compiled old'] / med['static compiled']:.3f}x, "
      f"new {med['hashed compiled new'] / med['static compiled']:.3f}x; eager hashed/static "
      f"{med['hashed eager'] / med['static eager']:.3f}x; compiled new / eager hashed "
      f"{med['hashed compiled new'] / med['hashed eager']:.3f}x")
print("load average:", open("/proc/loadavg").read().split()[:3])
