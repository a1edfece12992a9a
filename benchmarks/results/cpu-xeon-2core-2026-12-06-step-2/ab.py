"""Before/after of the eager fused update in ONE process: the files fused_rows.py and
fused_rules_elementwise.py of commit BASE are loaded beside this tree's as separate module
objects, and each step calls one or the other (fused_groups.update_touched_rows swapped around
the step), alternating with FBGEMM's CPU TBE (dlrm preset: 26 x 100k x 64, batch 4096, L ids a
bag, 1 thread, thread CPU time, medians; 3 batches rotating). Two copies of the tables are
trained, one per version, and must stay bit-identical step after step.

    python ab.py L OPTIMIZER ROUNDS BASE
"""
import statistics
import subprocess
import sys
import time
import types

import torch
import jaggedrec as jr
import jaggedrec.distributed.fused_params as fp
from jaggedrec.ops import fused_groups, fused_rows

L, opt_name, rounds, base = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(1)


def load_old(path, name, patch=None):
    src = subprocess.run(["git", "show", f"{base}:{path}"], capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(name)
    mod.__file__ = path
    exec(compile(src, f"{base}:{path}", "exec"), mod.__dict__)
    for k, v in (patch or {}).items():
        setattr(mod, k, v)
    return mod


old_elem = load_old("jaggedrec/ops/fused_rules_elementwise.py", "old_elementwise")
old_rows = load_old("jaggedrec/ops/fused_rows.py", "old_rows")
old_rows.scaled_gradient = old_elem.scaled_gradient

torch.manual_seed(0)
tables = [torch.empty(R, D).uniform_(-0.01, 0.01) for _ in range(T)]
cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]


def make_ebc():
    ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=fp.fused_optimizer_from_params(
        {"optimizer": opt_name.upper(), "learning_rate": 0.01}))
    ebc.load_state_dict({f"embedding_bags.t{i}.weight": t for i, t in enumerate(tables)}, strict=False)
    return ebc


kjts = []
for s in range(3):
    g = torch.Generator().manual_seed(s)
    kjts.append(jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], torch.randint(0, R, (T * B * L,), generator=g),
                                     lengths=torch.full((T * B,), L)))
grad = torch.randn(B, T * D)
new_update = fused_rows.update_touched_rows


def ours(update):
    ebc = make_ebc()

    def step(i):
        fused_groups.update_touched_rows = update
        try:
            ebc(kjts[i % 3]).values().backward(grad)
        finally:
            fused_groups.update_touched_rows = new_update
    step.ebc = ebc
    return step


from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen  # noqa: E402
tbe = SplitTableBatchedEmbeddingBagsCodegen(
    [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T, optimizer=EmbOptimType[opt_name.upper()],
    learning_rate=0.01, weights_precision=SparseType.FP32, output_dtype=SparseType.FP32,
    pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
with torch.no_grad():
    for t, w in enumerate(tbe.split_embedding_weights()):
        w.copy_(tables[t])
fb_in = [(k.values(), k.offsets()) for k in kjts]


def fbgemm(i):
    tbe(*fb_in[i % 3]).backward(grad)


provs = [(f"before ({base})", ours(old_rows.update_touched_rows)), ("after (this tree)", ours(new_update)),
         ("fbgemm", fbgemm)]
res = {n: [] for n, _ in provs}
load0 = open("/proc/loadavg").read().split()[0]
for i in range(rounds + 2):
    k = i % len(provs)
    order = provs[k:] + provs[:k]
    for name, f in (order if i % 2 == 0 else order[::-1]):
        t = time.thread_time()
        f(i)
        if i >= 2:
            res[name].append(1000 * (time.thread_time() - t))
    # both versions took the same steps: their tables must agree bit for bit
    before_ebc, after_ebc = provs[0][1].ebc, provs[1][1].ebc
    same = all(torch.equal(a, b) for a, b in zip(before_ebc.state_dict().values(), after_ebc.state_dict().values()))
    assert same, f"round {i}: before and after differ"
fb = statistics.median(res["fbgemm"])
print(f"L={L} {opt_name} 1 thread, thread CPU, {rounds} rounds, load {load0}-"
      f"{open('/proc/loadavg').read().split()[0]} (loaded); tables bit-identical before/after after every round:")
for name, v in res.items():
    m = statistics.median(v)
    print(f"  {name}: {m:.1f} ms" + ("" if name == "fbgemm" else f"  fbgemm/ours {fb / m:.2f}"))
