"""One group of the dlrm preset's fused update (8 tables x 100k rows x 64, batch 4096, L ids a bag;
8 tables at L=1, 1 at L >= 8, as fused_groups groups them),
its stages timed apart, variants alternated in one process (thread CPU time, 1 thread).

    python group.py L OPTIMIZER(sgd|exact_adagrad) ROUNDS
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from jaggedrec.ops import fused_rows
from jaggedrec.ops.fused_rules import EXACT_ADAGRAD, SGD, StepRule
from jaggedrec.ops.runs_torch import sort_rows

torch.set_num_threads(1)
L, name, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
R, D, B, KEYS = 100_000, 64, 4096, 26
# the tables of one group as fused_groups cuts them: at least 2**15 ids
T = max(1, -(-(1 << 15) // (B * L)))
gen = torch.Generator().manual_seed(0)
block = torch.empty(T * R, D).uniform_(-0.01, 0.01, generator=gen)
state = torch.zeros(T * R, D) if name == "exact_adagrad" else None
grad_out = torch.randn(B, KEYS * D, generator=gen)
ids = torch.cat([torch.randint(0, R, (B * L,), generator=gen) + t * R for t in range(T)])
if L <= 2:
    grads = grad_out.view(-1, D)
    bags = torch.cat([(torch.arange(B, dtype=torch.int32) * KEYS + t).repeat_interleave(L) for t in range(T)])
else:
    grads = torch.cat([grad_out[:, t * D:(t + 1) * D] for t in range(T)])
    bags = torch.cat([(torch.arange(B, dtype=torch.int32) + t * B).repeat_interleave(L) for t in range(T)])
rule = StepRule(SGD if name == "sgd" else EXACT_ADAGRAD, [0.01, 1e-8, 0.0, 0.9, 0.999, float("inf")], 1)
states = (state, None)

VARIANTS = {"current": lambda: fused_rows.update_touched_rows(block, states, ids, bags, grads, None, rule)}
stages = {
    "sort int64->int32 stable": lambda: sort_rows(ids, T * R),
    "sort int64 stable": lambda: torch.sort(ids, stable=True),
    "sort int32 unstable": lambda: torch.sort(ids.to(torch.int32)),
}


def timeit(fns, rounds):
    res = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            t = time.thread_time()
            fns[k]()
            res[k].append(1000 * (time.thread_time() - t))
    return {k: statistics.median(v) for k, v in res.items()}


if __name__ == "__main__":
    for k, v in timeit({**VARIANTS, **stages}, rounds).items():
        print(f"{k}: {v:.2f} ms")
