"""The dlrm train step (26 x 100k x 64, batch 4096, L ids a bag, 1 thread) with settings of
fused_rows switched around each step, beside FBGEMM's CPU TBE, all alternating in one process
(thread CPU time, medians; 3 batches rotating).

    python knob.py L OPTIMIZER ROUNDS NAME=VALUE[,NAME=VALUE] ...

Each argument is one variant: fused_rows module attributes set for its steps ("-" : as is).
"""
import statistics
import sys
import time

import torch
import jaggedrec as jr
import jaggedrec.distributed.fused_params as fp
from jaggedrec.ops import fused_rows

L, opt_name, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
variants = sys.argv[4:] or ["-"]
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(1)
torch.manual_seed(0)
tables = [torch.empty(R, D).uniform_(-0.01, 0.01) for _ in range(T)]
cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=fp.fused_optimizer_from_params(
    {"optimizer": opt_name.upper(), "learning_rate": 0.01}))
ebc.load_state_dict({f"embedding_bags.t{i}.weight": t for i, t in enumerate(tables)}, strict=False)
kjts = []
for s in range(3):
    g = torch.Generator().manual_seed(s)
    kjts.append(jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], torch.randint(0, R, (T * B * L,), generator=g),
                                     lengths=torch.full((T * B,), L)))
grad = torch.randn(B, T * D)

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


class _NoReadFirst:
    """fused_rows.F without the scattered rows' read-first gather (for F=NO_READ_FIRST)."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def embedding_bag(*args, **kwargs):
        if len(args) > 2 and args[2] is fused_rows._FIRST_OFFSET:
            return None
        return torch.nn.functional.embedding_bag(*args, **kwargs)


def settings(spec):
    if spec == "-":
        return {}
    out = {}
    for item in spec.split(","):
        k, v = item.split("=")
        out[k] = eval(v, {**vars(fused_rows), "NO_READ_FIRST": _NoReadFirst()})
    return out


def ours(spec):
    values = settings(spec)

    def step(i):
        saved = {k: getattr(fused_rows, k) for k in values}
        for k, v in values.items():
            setattr(fused_rows, k, v)
        try:
            ebc(kjts[i % 3]).values().backward(grad)
        finally:
            for k, v in saved.items():
                setattr(fused_rows, k, v)
    return step


def fbgemm(i):
    tbe(*fb_in[i % 3]).backward(grad)


provs = [(f"jaggedrec {v}", ours(v)) for v in variants] + [("fbgemm", fbgemm)]
for _, f in provs:
    f(0)
    f(1)
res = {n: [] for n, _ in provs}
load = open("/proc/loadavg").read().split()[0]
for i in range(rounds):
    k = i % len(provs)
    order = provs[k:] + provs[:k]
    for name, f in (order if i % 2 == 0 else order[::-1]):
        t = time.thread_time()
        f(i)
        res[name].append(1000 * (time.thread_time() - t))
fb = statistics.median(res["fbgemm"])
print(f"L={L} {opt_name} 1 thread, thread CPU, {rounds} rounds, load {load}-{open('/proc/loadavg').read().split()[0]} (loaded):")
for name, v in res.items():
    m = statistics.median(v)
    print(f"  {name}: {m:.1f} ms" + ("" if name == "fbgemm" else f"  fbgemm/ours {fb / m:.2f}"))
