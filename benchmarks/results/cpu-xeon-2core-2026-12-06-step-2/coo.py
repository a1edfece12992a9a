"""Rows read once: w[r] += alpha * g[bag] straight from the bag gradients, one COO addmm_
(per id an axpy of the bag's gradient row), against the current sums + sparse add."""
import sys
import warnings
import torch, torch.nn.functional as F
from group import block, ids, bags, grads, R, T, D, timeit
from jaggedrec.ops import fused_rows
from jaggedrec.ops.runs_torch import sort_rows, row_runs

warnings.simplefilter("ignore")
rounds = int(sys.argv[3])
s, o = sort_rows(ids, T * R)
runs = row_runs(s, o, bags, None, T * R, unique=True)
off = runs.run_offsets.to(runs.bags.dtype)
rows_all = runs.rows.long()
U = rows_all.shape[0]
alpha = -0.01
bags_sorted = runs.bags.long()


def current(per=4096):
    for lo in range(0, U, per):
        hi = min(U, lo + per)
        a, b = int(off[lo]), int(off[hi])
        sums = F.embedding_bag(runs.bags[a:b], grads, off[lo:hi + 1] - a, mode="sum", include_last_offset=True)
        rows = rows_all[lo:hi]
        F.embedding_bag(rows, block, fused_rows._FIRST_OFFSET, mode="sum")
        block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                           check_invariants=False), alpha=alpha)


ones = torch.ones(ids.shape[0])
rows_sorted = s.long()


def coo(per=None, first=False):
    n = rows_sorted.shape[0]
    per = per or n
    for lo in range(0, n, per):
        hi = min(n, lo + per)
        r, b = rows_sorted[lo:hi], bags_sorted[lo:hi]
        if first:
            F.embedding_bag(r, block, fused_rows._FIRST_OFFSET, mode="sum")
        m = torch.sparse_coo_tensor(torch.stack([r, b]), ones[lo:hi], (block.shape[0], grads.shape[0]),
                                    is_coalesced=False, check_invariants=False)
        block.addmm_(m, grads, alpha=alpha)


def coo_unsorted():
    m = torch.sparse_coo_tensor(torch.stack([ids, bags.long()]), ones, (block.shape[0], grads.shape[0]),
                                is_coalesced=False, check_invariants=False)
    block.addmm_(m, grads, alpha=alpha)


# bits: with duplicates they differ; check on a copy where every row is read once
single = torch.ones(U, dtype=torch.bool)
b0 = block.clone()
uniq_pos = off[:-1][(off[1:] - off[:-1]) == 1].long()
r1, g1 = rows_sorted[uniq_pos], bags_sorted[uniq_pos]
sums = F.embedding_bag(g1, grads, torch.arange(r1.shape[0] + 1), mode="sum", include_last_offset=True)
ref = block.clone().add_(torch.sparse_coo_tensor(r1.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                                  check_invariants=False), alpha=alpha)
block.addmm_(torch.sparse_coo_tensor(torch.stack([r1, g1]), torch.ones(r1.shape[0]), (block.shape[0], grads.shape[0]),
                                     is_coalesced=False, check_invariants=False), grads, alpha=alpha)
print("rows read once, same bits:", torch.equal(ref, block), r1.shape[0], "of", U)
block.copy_(b0)
print(timeit({"current": current, "coo whole": coo, "coo 4096 first": lambda: coo(4096, True),
              "coo 4096": lambda: coo(4096), "coo unsorted": coo_unsorted}, rounds))
