"""Exact Adagrad's scattered path of update_touched_rows stage by stage (group.py's inputs,
L ids a bag), chunked as the code chunks; thread CPU time summed over chunks, medians."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from group import block, ids, bags, grads, state, R, T, D
from jaggedrec.ops import fused_rows
from jaggedrec.ops.runs_torch import row_runs, sort_rows

rounds = int(sys.argv[3])
IN_PLACE = len(sys.argv) > 4 and sys.argv[4] == 'in-place'
acc = {}
lr, eps = 0.01, 1e-8
for r in range(rounds):
    tt = {}
    t = time.thread_time()

    def lap(name):
        global t
        now = time.thread_time()
        tt[name] = tt.get(name, 0.0) + now - t
        t = now
    sorted_ids, order = sort_rows(ids, T * R); lap("sort")
    n = int((sorted_ids[1:] != sorted_ids[:-1]).sum()) + 1; lap("count")
    rows_u, counts = torch.unique_consecutive(sorted_ids, return_counts=True); lap("unique")
    run_offsets = F.pad(counts.cumsum(0), (1, 0)); lap("cumsum")
    sbags = bags.index_select(0, order); lap("bags gather")
    run_offsets = run_offsets.to(sbags.dtype); lap("offsets cast")
    U = rows_u.shape[0]
    per = fused_rows._SCATTERED_CHUNK_BYTES[fused_rows.EXACT_ADAGRAD] // (D * 4)
    starts = list(range(0, U, per)) + [U]
    first = run_offsets[starts].tolist(); lap("chunks")
    for lo, hi, a, b in zip(starts, starts[1:], first, first[1:]):
        sums = F.embedding_bag(sbags[a:b], grads, run_offsets[lo:hi + 1] - a, mode="sum", include_last_offset=True)
        lap("sums")
        rows = rows_u[lo:hi].long(); lap("misc")
        s1 = state.index_select(0, rows); lap("state gather")
        s1.addcmul_(sums, sums); lap("addcmul")
        if IN_PLACE:  # the state written back first, its gathered copy then becomes the denominator
            fused_rows.copy_rows(state, rows, s1); lap("state write")
            den = s1.sqrt_().add_(eps); lap("sqrt+eps")
            sums.mul_(-lr).div_(den); lap("mul+div")
        else:
            den = s1.sqrt().add_(eps); lap("sqrt+eps")
            sums.mul_(-lr).div_(den); lap("mul+div")
            fused_rows.copy_rows(state, rows, s1); lap("state write")
        F.embedding_bag(rows, block, fused_rows._FIRST_OFFSET, mode="sum"); lap("readfirst")
        block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                           check_invariants=False), alpha=1.0); lap("sparse add")
    for k, v in tt.items():
        acc.setdefault(k, []).append(1000 * v)
tot = sum(statistics.median(v) for v in acc.values())
for k, v in acc.items():
    print(f"{k}: {statistics.median(v):.2f} ms ({100 * statistics.median(v) / tot:.0f}%)")
print(f"total {tot:.1f} ms")
