"""SGD at 1 id per bag: the floor of the torch ops the update cannot do without, against
FBGEMM's whole backward, in one process (dlrm preset, 1 thread, thread CPU time, medians).
../cpu-xeon-2core-2026-12-06-step-2/floor.py with two more rows: the same run sums scattered by
``index_put_(accumulate=True)`` and by ``index_add_(alpha=)``, the torch scatters that round
``-lr * g`` before the add (other bits than the sparse add's one FMA), to see whether giving up
the bits would lower the floor.

Per step, the 26 tables in fused_groups' groups (8, 8, 8, 2 tables): the runs sorted beforehand
(outside the timing), then only
  "sums + scatter": per scattered chunk (fused_rows's size) one embedding_bag of the run sums, the read-first gather
                    and the sparse add (the fastest same-bits scatter found), no other op;
  "sort":           the stable sort of each group's ids;
  "sums + index_put" / "sums + index_add": the run sums, then the other two scatters;
beside our whole backward (fused update included) and FBGEMM's (forward outside the timing).

    python sgd_floor.py ROUNDS
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import jaggedrec as jr
import jaggedrec.distributed.fused_params as fp
from jaggedrec.ops import fused_rows
from jaggedrec.ops.runs_torch import row_runs, sort_rows

rounds = int(sys.argv[1])
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(1)
torch.manual_seed(0)
tables = [torch.empty(R, D).uniform_(-0.01, 0.01) for _ in range(T)]
kjts, fb_in = [], []
for s in range(3):
    g = torch.Generator().manual_seed(s)
    v = torch.randint(0, R, (T * B,), generator=g)
    kjts.append(jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], v, lengths=torch.ones(T * B, dtype=torch.int64)))
    fb_in.append((v, torch.arange(T * B + 1)))
grad = torch.randn(B, T * D)
cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=fp.fused_optimizer_from_params(
    {"optimizer": "EXACT_SGD", "learning_rate": 0.01}))
ebc.load_state_dict({f"embedding_bags.t{i}.weight": t for i, t in enumerate(tables)}, strict=False)

from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen  # noqa: E402
tbe = SplitTableBatchedEmbeddingBagsCodegen(
    [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T, optimizer=EmbOptimType.EXACT_SGD,
    learning_rate=0.01, weights_precision=SparseType.FP32, output_dtype=SparseType.FP32,
    pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
with torch.no_grad():
    for t, w in enumerate(tbe.split_embedding_weights()):
        w.copy_(tables[t])

# the floor's own copy of the tables, in groups of 8 as fused_groups cuts them
groups = [list(range(lo, min(T, lo + 8))) for lo in range(0, T, 8)]
blocks = [torch.cat([tables[t] for t in grp]) for grp in groups]
grad_rows = grad.view(-1, D)  # bag b of feature t: row b * T + t (the in-place bag gradients)


def group_inputs(i):
    values = fb_in[i % 3][0].view(T, B)
    out = []
    for grp in groups:
        ids = torch.cat([values[t] + j * R for j, t in enumerate(grp)])
        bags = torch.cat([torch.arange(B, dtype=torch.int32) * T + t for t in grp])
        runs = row_runs(*sort_rows(ids, len(grp) * R), bags, None, len(grp) * R, unique=True)
        out.append((ids, runs, runs.run_offsets.to(torch.int32), runs.rows.long()))
    return out


inputs = [group_inputs(i) for i in range(3)]
per = fused_rows._SCATTERED_CHUNK_BYTES[fused_rows.SGD] // (D * 4)


def sums_and_scatter(i):
    for block, (_, runs, off, rows) in zip(blocks, inputs[i % 3]):
        num = rows.shape[0]
        starts = list(range(0, num, per)) + [num]
        first = off[starts].tolist()
        for lo, hi, a, b in zip(starts, starts[1:], first, first[1:]):
            sums = F.embedding_bag(runs.bags[a:b], grad_rows, off[lo:hi + 1] - a, mode="sum",
                                   include_last_offset=True)
            r = rows[lo:hi]
            F.embedding_bag(r, block, fused_rows._FIRST_OFFSET, mode="sum")
            block.add_(torch.sparse_coo_tensor(r.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                               check_invariants=False), alpha=-0.01)


def sums_and_index_put(i):
    for block, (_, runs, off, rows) in zip(blocks, inputs[i % 3]):
        num = rows.shape[0]
        starts = list(range(0, num, per)) + [num]
        first = off[starts].tolist()
        for lo, hi, a, b in zip(starts, starts[1:], first, first[1:]):
            sums = F.embedding_bag(runs.bags[a:b], grad_rows, off[lo:hi + 1] - a, mode="sum",
                                   include_last_offset=True)
            block.index_put_((rows[lo:hi],), sums.mul_(-0.01), accumulate=True)


def sums_and_index_add(i):
    for block, (_, runs, off, rows) in zip(blocks, inputs[i % 3]):
        num = rows.shape[0]
        starts = list(range(0, num, per)) + [num]
        first = off[starts].tolist()
        for lo, hi, a, b in zip(starts, starts[1:], first, first[1:]):
            sums = F.embedding_bag(runs.bags[a:b], grad_rows, off[lo:hi + 1] - a, mode="sum",
                                   include_last_offset=True)
            block.index_add_(0, rows[lo:hi], sums, alpha=-0.01)


def sort_only(i):
    for block, (ids, _, _, _) in zip(blocks, inputs[i % 3]):
        sort_rows(ids, block.shape[0])


res = {k: [] for k in ("ours backward", "fbgemm backward", "sums + scatter", "sort", "sums + index_put", "sums + index_add")}
for i in range(rounds + 2):
    out = ebc(kjts[i % 3]).values()
    t = time.thread_time()
    out.backward(grad)
    ours = time.thread_time() - t
    out = tbe(*fb_in[i % 3])
    t = time.thread_time()
    out.backward(grad)
    fb = time.thread_time() - t
    t = time.thread_time()
    sums_and_scatter(i)
    floor = time.thread_time() - t
    t = time.thread_time()
    sort_only(i)
    srt = time.thread_time() - t
    t = time.thread_time()
    sums_and_index_put(i)
    ip = time.thread_time() - t
    t = time.thread_time()
    sums_and_index_add(i)
    ia = time.thread_time() - t
    if i >= 2:
        for k, v in zip(res, (ours, fb, floor, srt, ip, ia)):
            res[k].append(1000 * v)
print(f"SGD L=1, 1 thread, thread CPU, {rounds} rounds, load {open('/proc/loadavg').read().split()[0]} (loaded):")
for k, v in res.items():
    print(f"  {k}: {statistics.median(v):.1f} ms")
