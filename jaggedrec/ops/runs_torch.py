"""The torch path's sort into runs: ids sorted by row, each touched row's run of ids a bag.

The backward of a gather-and-pool is itself a gather-and-pool: sorted by row, a table's ids
form runs of equal rows, and a row's gradient is the sum, over its run, of the gradients of
the bags those ids were read in (times their per-sample weights). So one ``embedding_bag``
over the bag gradients, with the runs as its bags, sums every touched row. The pooled op's
weight gradients, the fused optimizer steps of both ops (``fused_torch``) and the static-shape
update all sort with :func:`sort_rows`, and so does the Triton path (``runs_triton``), whose
runs, like the static-shape update's, are laid out by :func:`run_starts`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from jaggedrec.ops import backends


class RowRuns(NamedTuple):
    """Ids sorted by row: each touched row's run of ids is a bag over the bag gradients."""

    rows: Optional[torch.Tensor]  # [U] touched rows ascending (eager), or None (all rows)
    run_offsets: torch.Tensor     # [U+1] (or [num_rows+1]) start of each row's run
    bags: torch.Tensor            # [N] bag of each sorted id
    per_sample_weights: Optional[torch.Tensor]  # [N] fp32 per-sample weight of each sorted id, or None


def sort_rows(ids: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` ids sorted (int32 when rows fit), and ``[N]`` the order that sorts them. Stable,
    so each run of equal ids, and any sum over it, comes out the same on every run."""
    narrow = ids.to(torch.int32) if num_rows < 2**31 else ids  # int32 sorts ~2x faster
    return torch.sort(narrow, stable=True)


def run_starts(is_start: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The runs of a sorted list of ``M``, with static shapes (the run count stays on the device).

    Args:
        is_start: ``[M]`` bool, a run starts at this position.
        positions: ``[M]`` int64 ``0 .. M-1``.
    Returns:
        ``[2M+1]`` int64: entry ``u`` is run ``u``'s first position for ``u`` below the run
        count, then ``M`` up to entry ``M``; the entries past ``M`` are scratch.
    """
    num = is_start.shape[0]
    # each start writes its position to its run's slot; every other entry writes to a spare
    # slot of its own past M (one shared spare slot would have millions of GPU threads
    # storing to one address)
    run_start = torch.full((2 * num + 1,), num, dtype=torch.int64, device=is_start.device)
    run_start.index_put_((torch.where(is_start, torch.cumsum(is_start, 0) - 1, num + 1 + positions),), positions)
    return run_start


def row_runs(sorted_ids: torch.Tensor, order: torch.Tensor, bag_of_id: torch.Tensor,
             per_sample_weights: Optional[torch.Tensor], num_rows: int, unique: bool) -> RowRuns:
    """Runs of equal rows in sorted ids (see :func:`sort_rows`). ``unique`` keeps only
    touched rows (eager only: U depends on the data); otherwise every row gets a run, empty
    for untouched ones."""
    if unique:
        rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    elif backends.host_readable(sorted_ids):  # ~2.5x faster than the scatter below; its size depends on the data
        rows, counts = None, torch.bincount(sorted_ids, minlength=num_rows)
    else:
        rows = None
        counts = torch.zeros(num_rows, dtype=torch.int64, device=sorted_ids.device)
        counts.scatter_add_(0, sorted_ids.long(), torch.ones_like(sorted_ids, dtype=torch.int64))
    # index_select, not bag_of_id[order]: the advanced-indexing gather is ~2x slower on CPU
    return RowRuns(rows, F.pad(counts.cumsum(0), (1, 0)), bag_of_id.index_select(0, order),
                   None if per_sample_weights is None else per_sample_weights.index_select(0, order).float())


def sum_rows_by_id(ids: torch.Tensor, bag_of_id: torch.Tensor, bag_grads: torch.Tensor,
                   per_sample_weights: Optional[torch.Tensor], num_rows: int, unique: bool):
    """Sum ``per_sample_weights[i] * bag_grads[bag_of_id[i]]`` over the ids of each row, one
    ``embedding_bag`` over the runs (:func:`row_runs`).

    Returns ``(rows, sums)``: with ``unique`` the touched rows ``[U]`` and ``[U, D]`` sums;
    otherwise ``None`` and dense ``[num_rows, D]`` sums.
    """
    runs = row_runs(*sort_rows(ids, num_rows), bag_of_id, per_sample_weights, num_rows, unique)
    sums = F.embedding_bag(runs.bags, bag_grads, runs.run_offsets, mode="sum",
                           per_sample_weights=runs.per_sample_weights, include_last_offset=True)
    return runs.rows, sums
