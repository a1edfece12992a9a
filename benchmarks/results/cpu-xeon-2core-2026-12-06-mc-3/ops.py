"""Where one eager remap's thread CPU time goes, per torch op and calling line (in one
process): a TorchDispatchMode reads time.thread_time around every aten op of
HashEmbeddingBagCollection.remap (the mc preset, 4 batches cycled, after 3 warm-up train
steps), and prints each (line, op)'s median over the remaps. The ops' own CPU time only
(no Python between them); the mode's overhead is outside the timed calls.

    python ops.py [rounds] [lines]
"""

import collections
import statistics
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class Timer(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seq = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        dt = time.thread_time() - t0
        where = next((f"{fr.filename.split('jaggedrec/')[-1]}:{fr.lineno}" for fr in traceback.extract_stack(limit=12)[::-1]
                      if "jaggedrec" in fr.filename and "_python_dispatch" not in fr.filename), "")
        self.seq.append((str(func), where, dt))
        return out


runs = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for raw, _ in batches:
        timer = Timer()
        with timer:
            hashed.remap(raw)
        runs.append(timer.seq)
agg = collections.defaultdict(list)
for seq in runs:
    per = collections.defaultdict(float)
    for f, where, dt in seq:
        per[(where, f)] += dt
    for k, v in per.items():
        agg[k].append(v)
print(f"ops a remap {len(runs[0])}, their thread CPU time a remap (median) "
      f"{statistics.median(sum(dt for _, _, dt in s) for s in runs) * 1e3:.3f} ms")
for ms, (where, f) in sorted(((statistics.median(v) * 1e3, k) for k, v in agg.items()), reverse=True)[:int(sys.argv[2]) if len(sys.argv) > 2 else 30]:
    print(f"{ms:7.3f} ms  {where:45s} {f}")

# by function: every op's time and count, summed over the function its calling line is in
import ast  # noqa: E402
import pathlib  # noqa: E402

spans = {}
for rel in ("ops/hash_probe_torch.py", "ops/hash_place_torch.py", "modules/hash_table.py",
            "modules/hash_embedding_modules.py", "sparse/_segments.py"):
    src = pathlib.Path(__import__("jaggedrec").__file__).parent / rel
    if not src.exists():  # hash_place_torch.py came with 35b13bb
        continue
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.FunctionDef):
            spans.setdefault(rel, []).append((node.lineno, node.end_lineno, node.name))


def func_of(where):
    rel, _, line = where.rpartition(":")
    best = None
    for lo, hi, name in spans.get(rel, []):
        if line.isdigit() and lo <= int(line) <= hi and (best is None or lo > best[0]):
            best = (lo, name)
    return f"{rel}:{best[1] if best else '?'}"


by_func = collections.defaultdict(lambda: [0.0, 0])
for seq in runs:
    for f, where, dt in seq:
        by_func[func_of(where)][0] += dt * 1e3 / len(runs)
        by_func[func_of(where)][1] += 1 / len(runs)
print("by function (mean a remap): ms, ops")
for name, (ms, n) in sorted(by_func.items(), key=lambda kv: -kv[1][0]):
    print(f"{ms:7.3f} ms {n:6.0f}  {name}")
