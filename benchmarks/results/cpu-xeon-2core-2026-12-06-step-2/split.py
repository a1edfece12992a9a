"""Where a dlrm train step goes, beside FBGEMM's step (alternating, one process) (1 thread, thread CPU time): forward, backward, the groups'
input building and update_touched_rows, medians over steps.

    python split.py L OPTIMIZER STEPS
"""
import statistics
import sys
import time

import torch
import jaggedrec as jr
import jaggedrec.distributed.fused_params as fp
from jaggedrec.ops import fused_groups, fused_rows

L, opt_name, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=fp.fused_optimizer_from_params(
    {"optimizer": opt_name.upper(), "learning_rate": 0.01}))
kjts = []
for s in range(3):
    g = torch.Generator().manual_seed(s)
    kjts.append(jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], torch.randint(0, R, (T * B * L,), generator=g),
                                     lengths=torch.full((T * B,), L)))
grad = torch.randn(B, T * D)
acc = {"group": 0.0, "update": 0.0}


def timed(module, name):
    fn = getattr(module, name)

    def wrapper(*a, **k):
        t = time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            acc[key[name]] += time.thread_time() - t
    setattr(module, name, wrapper)


key = {"_update_table_group": "group", "update_touched_rows": "update"}
timed(fused_groups, "_update_table_group")
fused_groups.update_touched_rows = None
timed(fused_rows, "update_touched_rows")
fused_groups.update_touched_rows = fused_rows.update_touched_rows
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
tbe = SplitTableBatchedEmbeddingBagsCodegen(
    [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T, optimizer=EmbOptimType[opt_name.upper()],
    learning_rate=0.01, weights_precision=SparseType.FP32, output_dtype=SparseType.FP32,
    pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
fb_in = [(k.values(), k.offsets()) for k in kjts]
res = {k: [] for k in ("forward", "backward", "groups-update", "update", "fbgemm forward", "fbgemm backward")}
for i in range(steps + 2):
    t0 = time.thread_time()
    out = tbe(*fb_in[(i + 1) % 3])
    t1 = time.thread_time()
    out.backward(grad)
    t2 = time.thread_time()
    if i >= 2:
        res["fbgemm forward"].append(t1 - t0)
        res["fbgemm backward"].append(t2 - t1)
    acc.update(group=0.0, update=0.0)
    t0 = time.thread_time()
    out = ebc(kjts[i % 3]).values()
    t1 = time.thread_time()
    out.backward(grad)
    t2 = time.thread_time()
    if i >= 2:
        res["forward"].append(t1 - t0)
        res["backward"].append(t2 - t1)
        res["groups-update"].append(acc["group"] - acc["update"])
        res["update"].append(acc["update"])
print(" ".join(f"{k} {1000 * statistics.median(v):.1f} ms" for k, v in res.items()))
