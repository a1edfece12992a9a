"""Scattered SGD rows: the current per-chunk sums + read-first + sparse add against
gather + add_ + write back (copy_rows), chunked alike (group.py's inputs, 1 thread)."""
import sys
import torch, torch.nn.functional as F
from group import block, ids, bags, grads, R, T, D, timeit
from jaggedrec.ops import fused_rows
from jaggedrec.ops.runs_torch import sort_rows, row_runs

rounds = int(sys.argv[3])
s, o = sort_rows(ids, T * R)
runs = row_runs(s, o, bags, None, T * R, unique=True)
off = runs.run_offsets.to(runs.bags.dtype)
rows_all = runs.rows.long()
U = rows_all.shape[0]
alpha = -0.01


def chunked(step, per=4096):
    for lo in range(0, U, per):
        hi = min(U, lo + per)
        a, b = int(off[lo]), int(off[hi])
        sums = F.embedding_bag(runs.bags[a:b], grads, off[lo:hi + 1] - a, mode="sum", include_last_offset=True)
        step(rows_all[lo:hi], sums)


def sparse_add(rows, sums):
    F.embedding_bag(rows, block, fused_rows._FIRST_OFFSET, mode="sum")
    block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                       check_invariants=False), alpha=alpha)


def gather_add_write(rows, sums):
    w = block.index_select(0, rows)
    w.add_(sums, alpha=alpha)
    fused_rows.copy_rows(block, rows, w)


def emb_gather_add_write(rows, sums):
    w = F.embedding(rows, block)
    w.add_(sums, alpha=alpha)
    fused_rows.copy_rows(block, rows, w)


def sums_only(rows, sums):
    pass


# the bits agree?
b0 = block.clone()
chunked(sparse_add)
b1 = block.clone()
block.copy_(b0)
chunked(gather_add_write)
print("same bits:", torch.equal(block, b1))
def sparse_add_no_first(rows, sums):
    block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                       check_invariants=False), alpha=alpha)


print(timeit({"sparse add 4096": lambda: chunked(sparse_add), "sparse add 1024": lambda: chunked(sparse_add, 1024),
              "sparse add 1024 no read-first": lambda: chunked(sparse_add_no_first, 1024),
              "gather-add-write 1024": lambda: chunked(gather_add_write, 1024),
              "gather-add-write 512": lambda: chunked(gather_add_write, 512),
              "sums only 1024": lambda: chunked(sums_only, 1024)}, rounds))
