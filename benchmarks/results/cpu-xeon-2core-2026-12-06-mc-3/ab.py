"""Old / new hashed train step in ONE process, alternating, thread CPU time, medians, with
the static steps beside them (the mc preset's batches, 4 cycled, fused RowWiseAdagrad, one
thread). "old": the hash-table files of commit BASE (hash_probe_torch.py, hash_place_torch.py where it
exists, hash_table.py, hash_embedding_modules.py, loaded under other module names beside the
installed library);
"new": the library as it is. After every round the two collections' state_dicts (weights,
fused state, id map) are asserted equal, so both train the same bits.

    python ab.py BASE [rounds]
"""

import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.benchmarks.providers import mc
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

base = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
root = pathlib.Path(jr.__file__).parent.parent
old_dir = pathlib.Path(f"/tmp/h2_ab_{base}")
old_dir.mkdir(exist_ok=True)
rename = {"jaggedrec/ops/hash_probe_torch.py": "old_hp", "jaggedrec/ops/hash_place_torch.py": "old_place",
          "jaggedrec/modules/hash_table.py": "old_ht", "jaggedrec/modules/hash_embedding_modules.py": "old_hem"}
for path, name in rename.items():
    shown = subprocess.run(["git", "-C", str(root), "show", f"{base}:{path}"], capture_output=True, text=True)
    if shown.returncode:  # not in BASE (hash_place_torch.py came with 35b13bb)
        continue
    src = shown.stdout.replace("from jaggedrec.ops import hash_probe_torch as hp", "import old_hp as hp")
    src = src.replace("from jaggedrec.ops import hash_place_torch as place", "import old_place as place")
    src = src.replace("from jaggedrec.ops.hash_probe_torch import", "from old_hp import")
    src = src.replace("from jaggedrec.modules.hash_table import", "from old_ht import")
    (old_dir / f"{name}.py").write_text(src)
sys.path.insert(0, str(old_dir))
import old_hem  # noqa: E402

torch.set_num_threads(1)
args = mc._parser().parse_args(["--module", "mc"])
w = mc._workload(args)
_, batches = mc._batches(w, 4, 0, "cpu")
fused = optim.RowWiseAdagrad(lr=0.01)
made = {}
for name, module in (("old", old_hem), ("new", None)):
    torch.manual_seed(0)
    if module is None:
        options = {f"t{t}": HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(w["tables"])}
        made[name] = HashEmbeddingBagCollection(mc._configs(w), options, backend="torch", fused_optimizer=fused)
    else:
        options = {f"t{t}": module.HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback")
                   for t in range(w["tables"])}
        made[name] = module.HashEmbeddingBagCollection(mc._configs(w), options, backend="torch", fused_optimizer=fused)
REMAP = {"old": [], "new": []}  # thread CPU time of each collection's remap (id map + reset), within the steps


def _timed_remap(side):
    inner = made[side].remap

    def remap(features):
        t0 = time.thread_time()
        out = inner(features)
        REMAP[side].append((time.thread_time() - t0) * 1e3)
        return out
    made[side].remap = remap


for side in list(made):
    _timed_remap(side)
static = jr.EmbeddingBagCollection(mc._configs(w), backend="torch", fused_optimizer=fused)
same = mc._same_rows(w, args, "cpu", batches)
F = {"train_hash_old": lambda b: made["old"](batches[b][0]).values().sum().backward(),
     "train_hash_new": lambda b: made["new"](batches[b][0]).values().sum().backward(),
     "train_static": lambda b: static(batches[b][1]).values().sum().backward(),
     "train_static_same_rows": lambda b: static(same[b]).values().sum().backward()}


def check():
    a, b = made["old"].state_dict(), made["new"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ("unplaced", "fallback"):
        assert torch.equal(getattr(made["old"].hash_state, k), getattr(made["new"].hash_state, k)), k


for _ in range(2):
    for b in range(4):
        for f in F.values():
            f(b)
check()
T = {n: [] for n in F}
for v in REMAP.values():
    v.clear()
loads = [os.getloadavg()[0]]
for r in range(rounds):
    names = list(F) if r % 2 == 0 else ["train_hash_new", "train_hash_old", "train_static", "train_static_same_rows"]
    for b in range(4):
        for name in names:
            t0 = time.thread_time()
            F[name](b)
            T[name].append((time.thread_time() - t0) * 1e3)
    check()
loads.append(os.getloadavg()[0])
m = {k: statistics.median(v) for k, v in T.items()}
print(f"base {base}, {rounds} rounds of 4 batches, 1-min load {loads[0]:.2f} -> {loads[1]:.2f}; state_dicts equal "
      f"after every round")
for k, v in m.items():
    print(f"{k:24s} {v:8.3f} ms")
for side in ("old", "new"):
    h = m[f"train_hash_{side}"]
    print(f"{side}: hashed / static {h / m['train_static']:.3f}x, hashed / static same rows "
          f"{h / m['train_static_same_rows']:.3f}x")
print(f"new / old {m['train_hash_new'] / m['train_hash_old']:.3f}")
r_old, r_new = (statistics.median(REMAP[side]) for side in ("old", "new"))
print(f"remap (id map + evicted rows' reset, inside the steps): old {r_old:.3f} ms, new {r_new:.3f} ms, "
      f"new / old {r_new / r_old:.3f}")
