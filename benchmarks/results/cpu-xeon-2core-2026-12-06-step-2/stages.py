"""The scattered SGD path of update_touched_rows, stage by stage (group.py's inputs)."""
import sys
import time
import statistics
import torch
import torch.nn.functional as F
sys.argv = sys.argv[:1] + ["1", "sgd", "1"] if len(sys.argv) < 2 else sys.argv
from group import block, ids, bags, grads, R, T, D
from jaggedrec.ops.runs_torch import sort_rows, row_runs
from jaggedrec.ops import fused_rows

rounds = int(sys.argv[3])
acc = {}
for r in range(rounds):
    t = [time.thread_time()]
    sorted_ids, order = sort_rows(ids, T * R); t.append(time.thread_time())
    n = int((sorted_ids[1:] != sorted_ids[:-1]).sum()) + 1; t.append(time.thread_time())
    runs = row_runs(sorted_ids, order, bags, None, T * R, unique=True); t.append(time.thread_time())
    run_offsets = runs.run_offsets.to(runs.bags.dtype); t.append(time.thread_time())
    rows = runs.rows.long()
    sums = F.embedding_bag(runs.bags, grads, run_offsets, mode="sum", include_last_offset=True); t.append(time.thread_time())
    F.embedding_bag(rows, block, fused_rows._FIRST_OFFSET, mode="sum"); t.append(time.thread_time())
    block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                       check_invariants=False), alpha=-0.01); t.append(time.thread_time())
    names = ["sort", "count", "unique+bags", "offsets", "sums", "readfirst", "sparse add"]
    for k, a, b in zip(names, t, t[1:]):
        acc.setdefault(k, []).append(1000 * (b - a))
for k, v in acc.items():
    print(f"{k}: {statistics.median(v):.2f} ms")
