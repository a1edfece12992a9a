"""The index work of the backward, in five small kernels instead of some seventy torch ops.

Before the run kernels (``row_runs``, ``pooled_fused``) can sum anything, the backward lists
the batch's contributions (every (pass, id) pair, see ``pooled_bwd.Contributions``), sorts
them by row, and lays out the runs of equal rows. As torch ops that was ~60 launches, each a
full pass over ``M`` entries (``runs_triton`` keeps that version as the reference and for
graphs compiled under the interpreter). Here:

* ``_contributions_kernel``: one pass over the bags lists every contribution (its feature,
  its row's element offset, -1 when masked: a bad id, or under VBE a bag no sample reads)
  and each id's bag;
* after ``torch.sort`` of the rows, ``_run_marks_kernel`` marks where runs start and gathers
  each sorted contribution's feature and, for the pooled op, where its gradient row starts
  and its factor (per-sample weight, MEAN's 1/length);
* after a ``cumsum`` of the marks, ``_run_layout_kernel`` writes each run's first position,
  row and feature, the run count, and the unused ``run_start`` slots;
* ``_long_marks_kernel`` marks runs longer than ``LONG_RUN``, and after a second ``cumsum``
  ``_long_layout_kernel`` ranks them and writes their count.

No output needs a fill before: the sort and the two cumsums are the only torch ops left
(scans and a sort across programs, which one launch of these kernels cannot do
deterministically). Everything is index arithmetic or the torch version's own float ops, so
the result is the same integers and bits as the torch version, entry for entry where they are
defined; per-run entries past the run count are left unset (every kernel masks them).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .common import (META_DIM, META_FIELDS, META_MEAN, META_OUT_COLUMN, META_ROWS, META_WEIGHT_OFFSET, interpreting,
                     wrap_triton)

# Bags per program of the contributions kernel, entries per program of the others: under the
# interpreter every program costs ~1 ms, so fewer and wider there.
BLOCK = 128


def _block() -> int:
    return 1024 if interpreting() else BLOCK


@triton.jit
def _contributions_kernel(values_ptr, offsets_ptr, pass_features_ptr, meta_ptr, bag_read_ptr, feature_ptr, rows_ptr,
                          bag_ptr, num_ids, num_bags, batch_size, num_keys, num_passes, HAS_BAG_READ: tl.constexpr,
                          BLOCK_B: tl.constexpr):
    """Bags ``b0 .. b0+BLOCK_B-1``: for each id of each bag, its bag; for each pass, the
    feature that reads the bag's key (-1: none, or the id is bad or its bag unread) and the element
    offset of the id's row in the flat weights (-1 where masked)."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = b < num_bags
    start = tl.load(offsets_ptr + b, mask=live, other=0).to(tl.int64)
    length = tl.load(offsets_ptr + b + 1, mask=live, other=0).to(tl.int64) - start
    key = b // batch_size
    read_bag = live
    if HAS_BAG_READ:
        read_bag = live & (tl.load(bag_read_ptr + b, mask=live, other=0) != 0)
    longest = tl.max(length, axis=0)
    for j in range(0, longest):
        here = live & (j < length)
        position = start + j
        tl.store(bag_ptr + position, b, mask=here)
        ids = tl.load(values_ptr + position, mask=here, other=0).to(tl.int64)
        read = here & read_bag
        for p in range(0, num_passes):
            feature = tl.load(pass_features_ptr + p * num_keys + key, mask=here, other=-1)
            meta = meta_ptr + tl.maximum(feature, 0).to(tl.int64) * META_FIELDS
            num_rows = tl.load(meta + META_ROWS, mask=here, other=0)
            valid = read & (feature >= 0) & (ids >= 0) & (ids < num_rows)
            row = tl.load(meta + META_WEIGHT_OFFSET, mask=valid, other=0) + ids * tl.load(meta + META_DIM, mask=valid,
                                                                                           other=0)
            slot = p * num_ids + position
            tl.store(feature_ptr + slot, tl.where(valid, feature, -1).to(tl.int32), mask=here)
            tl.store(rows_ptr + slot, tl.where(valid, row, -1), mask=here)


@triton.jit
def _run_marks_kernel(sorted_rows_ptr, order_ptr, feature_ptr, starts_ptr, sorted_feature_ptr, bag_ptr, offsets_ptr,
                      psw_ptr, meta_ptr, item_offset_ptr, scale_ptr, num, num_values, batch_size, row_stride,
                      BAG_ROWS: tl.constexpr, HAS_PSW: tl.constexpr, HAS_MEAN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Sorted positions ``i``: 1 where a run starts (a live row unlike the one before), and
    the contribution's feature (masked ones: 0). With BAG_ROWS (the pooled op) also where its
    gradient row starts, ``(bag % batch_size) * row_stride`` plus the feature's output column,
    and its factor: the id's per-sample weight (HAS_PSW) times, for a MEAN feature (HAS_MEAN:
    some feature pools by MEAN), 1/length of its bag."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = i < num
    row = tl.load(sorted_rows_ptr + i, mask=live, other=-1).to(tl.int64)
    previous = tl.load(sorted_rows_ptr + i - 1, mask=live & (i > 0), other=-1).to(tl.int64)
    tl.store(starts_ptr + i, ((row >= 0) & (row != previous)).to(tl.int32), mask=live)
    contribution = tl.load(order_ptr + i, mask=live, other=0).to(tl.int64)
    feature = tl.maximum(tl.load(feature_ptr + contribution, mask=live, other=0), 0).to(tl.int64)
    tl.store(sorted_feature_ptr + i, feature, mask=live)
    if BAG_ROWS:
        value = contribution % num_values
        bag = tl.load(bag_ptr + value, mask=live, other=0)
        meta = meta_ptr + feature * META_FIELDS
        column = tl.load(meta + META_OUT_COLUMN, mask=live, other=0)
        tl.store(item_offset_ptr + i, (bag % batch_size) * row_stride + column, mask=live)
        if HAS_PSW or HAS_MEAN:
            scale = tl.full([BLOCK_M], 1.0, tl.float32)
            if HAS_PSW:
                scale = tl.load(psw_ptr + value, mask=live, other=1.0).to(tl.float32)
            if HAS_MEAN:
                start = tl.load(offsets_ptr + bag, mask=live, other=0)
                length = tl.maximum(tl.load(offsets_ptr + bag + 1, mask=live, other=1) - start, 1)
                # correctly rounded, as torch's reciprocal is, so the factor keeps its bits
                inverse = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), length.to(tl.float32))
                mean = tl.load(meta + META_MEAN, mask=live, other=0) != 0
                scale = tl.where(mean, scale * inverse, scale)
            tl.store(scale_ptr + i, scale, mask=live)


@triton.jit
def _run_layout_kernel(sorted_rows_ptr, starts_ptr, rank_ptr, sorted_feature_ptr, run_start_ptr, run_row_ptr,
                       run_feature_ptr, num_runs_ptr, num, BLOCK_M: tl.constexpr):
    """Positions ``i`` in ``0..num``: each run start (rank ``r``, counted from 1 by the cumsum)
    writes run ``r-1``'s first position, row and feature; ``run_start`` slots from the run
    count to ``num`` get ``num``, and position ``num`` writes the run count (nothing filled before)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = i < num
    is_start = live & (tl.load(starts_ptr + i, mask=live, other=0) != 0)
    rank = tl.load(rank_ptr + i, mask=live, other=0)
    u = rank - 1
    tl.store(run_start_ptr + u, i, mask=is_start)
    tl.store(run_row_ptr + u, tl.load(sorted_rows_ptr + i, mask=is_start, other=0).to(tl.int64), mask=is_start)
    tl.store(run_feature_ptr + u, tl.load(sorted_feature_ptr + i, mask=is_start, other=0), mask=is_start)
    # the run count: the cumsum's last entry (0 with no contributions)
    total = tl.load(rank_ptr + (num - 1) + i * 0, mask=(i <= num) & (i * 0 + num > 0), other=0)
    tl.store(run_start_ptr + i, i * 0 + num, mask=(i <= num) & (i >= total))
    tl.store(num_runs_ptr + i * 0, total, mask=i == num)


@triton.jit
def _long_marks_kernel(run_start_ptr, num_runs_ptr, marks_ptr, num, LONG: tl.constexpr, BLOCK_M: tl.constexpr):
    """Runs ``u``: 1 where the run holds more than ``LONG`` contributions (runs past the count: 0)."""
    u = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = u < num
    live = in_range & (u < tl.load(num_runs_ptr))
    length = tl.load(run_start_ptr + u + 1, mask=live, other=0) - tl.load(run_start_ptr + u, mask=live, other=0)
    tl.store(marks_ptr + u, (live & (length > LONG)).to(tl.int32), mask=in_range)


@triton.jit
def _long_layout_kernel(marks_ptr, rank_ptr, long_rank_ptr, long_runs_ptr, num_long_ptr, num, BLOCK_M: tl.constexpr):
    """Runs ``u`` in ``0..num``: the rank among long runs (-1 for the others), the long runs in
    order, and (position ``num``) their count."""
    u = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = u < num
    is_long = in_range & (tl.load(marks_ptr + u, mask=in_range, other=0) != 0)
    rank = tl.load(rank_ptr + u, mask=in_range, other=0)
    tl.store(long_rank_ptr + u, tl.where(is_long, rank - 1, -1), mask=in_range)
    tl.store(long_runs_ptr + rank - 1, u, mask=is_long)
    total = tl.load(rank_ptr + (num - 1) + u * 0, mask=(u == num) & (u * 0 + num > 0), other=0)
    tl.store(num_long_ptr + u * 0, total, mask=u == num)


def contributions(values, offsets, pass_features, meta, bag_read, feature, rows, bag, batch_size: int) -> None:
    """Fill ``feature`` (``[P*N]`` int32), ``rows`` (``[P*N]`` int64) and ``bag`` (``[N]``
    int64) for ``[N]`` ids in ``[K*B+1]`` offsets; ``pass_features``: ``[P, K]`` int32;
    ``bag_read``: ``[K*B]`` bool, or None (every bag is read)."""
    num_bags = offsets.shape[0] - 1
    num_passes, num_keys = pass_features.shape
    block = _block()
    if statically_known_true(num_bags == 0):  # no bags, no ids: nothing to list (and no batch size to divide by)
        return
    wrap_triton(_contributions_kernel)[(triton.cdiv(num_bags, block),)](
        values, offsets, pass_features, meta, bag_read if bag_read is not None else offsets, feature, rows, bag,
        values.shape[0], num_bags, batch_size, num_keys, num_passes, HAS_BAG_READ=bag_read is not None,
        BLOCK_B=block)


def run_marks(sorted_rows, order, feature, starts, sorted_feature, bag_rows=None) -> None:
    """Fill ``starts`` (``[M]`` int32) and ``sorted_feature`` (``[M]`` int64). ``bag_rows``
    (the pooled op): ``(bag, offsets, per_sample_weights or None, meta, any_mean, batch_size,
    row_stride, item_offset, scale or None)``, ``item_offset`` (``[M]`` int64) and ``scale``
    (``[M]`` fp32, None when there is no factor) filled too; ``bag``: ``[N]`` int64 each id's bag."""
    num = sorted_rows.shape[0]
    block = _block()
    if bag_rows is None:
        bag = offsets = psw = meta = item_offset = scale = sorted_rows
        any_mean, batch_size, row_stride, num_values = False, 1, 0, 1
    else:
        bag, offsets, psw, meta, any_mean, batch_size, row_stride, item_offset, scale = bag_rows
        num_values = bag.shape[0]
    wrap_triton(_run_marks_kernel)[(triton.cdiv(num, block),)](
        sorted_rows, order, feature, starts, sorted_feature, bag, offsets, psw if psw is not None else offsets, meta,
        item_offset, scale if scale is not None else offsets, num, num_values, batch_size, row_stride,
        BAG_ROWS=bag_rows is not None, HAS_PSW=bag_rows is not None and psw is not None,
        HAS_MEAN=bag_rows is not None and any_mean, BLOCK_M=block)


def run_layout(sorted_rows, starts, rank, sorted_feature, run_start, run_row, run_feature, num_runs) -> None:
    """``run_start``: ``[M+1]`` int64, every entry written; ``num_runs``: ``[1]`` int64, written."""
    num = sorted_rows.shape[0]
    block = _block()
    wrap_triton(_run_layout_kernel)[(triton.cdiv(num + 1, block),)](
        sorted_rows, starts, rank, sorted_feature, run_start, run_row, run_feature, num_runs, num, BLOCK_M=block)


def long_marks(run_start, num_runs, marks, long_run: int) -> None:
    num = marks.shape[0]
    block = _block()
    wrap_triton(_long_marks_kernel)[(triton.cdiv(num, block),)](run_start, num_runs, marks, num, LONG=long_run,
                                                               BLOCK_M=block)


def long_layout(marks, rank, long_rank, long_runs, num_long) -> None:
    """``num_long``: ``[1]`` int64, written."""
    num = marks.shape[0]
    block = _block()
    wrap_triton(_long_layout_kernel)[(triton.cdiv(num + 1, block),)](marks, rank, long_rank, long_runs, num_long,
                                                                    num, BLOCK_M=block)
