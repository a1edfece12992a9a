"""FBGEMM's CPU TBE step split into forward and backward (dlrm preset, 1 thread, thread CPU time).

    python fb_split.py L OPTIMIZER STEPS
"""
import statistics
import sys
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

L, name, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(1)
tbe = SplitTableBatchedEmbeddingBagsCodegen(
    [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T, optimizer=EmbOptimType[name.upper()],
    learning_rate=0.01, weights_precision=SparseType.FP32, output_dtype=SparseType.FP32,
    pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
batches = []
for s in range(3):
    g = torch.Generator().manual_seed(s)
    lengths = torch.full((T * B,), L)
    batches.append((torch.randint(0, R, (T * B * L,), generator=g), torch.nn.functional.pad(lengths.cumsum(0), (1, 0))))
grad = torch.randn(B, T * D)
f, b = [], []
for i in range(steps + 2):
    t0 = time.thread_time()
    out = tbe(*batches[i % 3])
    t1 = time.thread_time()
    out.backward(grad)
    t2 = time.thread_time()
    if i >= 2:
        f.append(t1 - t0)
        b.append(t2 - t1)
print(f"fbgemm {name} L={L}: forward {1000 * statistics.median(f):.1f} ms backward {1000 * statistics.median(b):.1f} ms")
