"""Backward of pooled embedding bags.

The op lists every (feature, id) pair as a *contribution* ``c`` in ``[0, P*N)``: id
``c % N`` as read by the feature of pass ``c // N`` (a pass holds each KJT key at most once;
a key read by two tables needs two passes). For each contribution it precomputes, with
plain torch ops and no host sync:

* ``contrib_feature[c]``: the feature, or -1 when the id is not read in that pass or is
  outside its table (such ids were skipped in the forward, so they get no gradient);
* ``contrib_row[c]``: element offset of the id's row in the flat weights (-1 when masked).

Sorted by row, the contributions form *runs* of equal rows (:func:`sort_runs`), and a run's
gradient is a bag in the forward's sense: the sum, over its contributions, of their bags'
output-gradient rows times a factor (per-sample weight, 1/length for MEAN). So the
deterministic kernel is the forward's gather-and-sum again, over runs instead of bags:
``BLOCK_U`` runs per program advance together, one contribution each per step, so that many
independent row loads are in flight even though most runs hold one or two contributions;
each run is summed in sorted order, which gives the same bits on every run.

* ``_rows_grad_kernel``, deterministic: per run, its sum, written once (dense, or compact
  for the sparse gradient). ``pooled_fused`` applies optimizers with the same run sums.
* ``_rows_grad_atomic_kernel``, fast: contributions in any order, ``atomic_add`` into rows.
* ``_psw_grad_kernel``: per contribution, the dot of its row with its bag's output gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
import triton.language as tl

from .common import META_FIELDS, block_d, persistent_programs, single_config, wrap_triton


def _q_configs(sizes):
    if single_config():
        return [triton.Config({"BLOCK_Q": 8}, num_warps=1)]
    return [triton.Config({"BLOCK_Q": q}, num_warps=w) for q, w in sizes]


@triton.jit
def _contribution_scale(c, mask, num_values, batch_size, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr,
                        psw_ptr, meta_ptr, HAS_PSW: tl.constexpr):
    """Per contribution: its feature's meta row, its sample b, and its factor (psw, / length for MEAN)."""
    f = tl.load(contrib_feature_ptr + c, mask=mask, other=0).to(tl.int64)
    v = c % num_values
    bag = tl.load(bag_of_value_ptr + v, mask=mask, other=0).to(tl.int64)
    meta = meta_ptr + f * META_FIELDS
    dim = tl.load(meta + 1, mask=mask, other=0)
    out_column = tl.load(meta + 3, mask=mask, other=0)
    key = tl.load(meta + 4, mask=mask, other=0)
    mean = tl.load(meta + 5, mask=mask, other=0)
    sample = bag - key * batch_size
    scale = tl.full(c.shape, 1.0, tl.float32)
    if HAS_PSW:
        scale = tl.load(psw_ptr + v, mask=mask, other=0.0).to(tl.float32)
    length = tl.load(offsets_ptr + bag + 1, mask=mask, other=1) - tl.load(offsets_ptr + bag, mask=mask, other=0)
    scale = tl.where(mean != 0, scale / tl.maximum(length, 1).to(tl.float32), scale)
    return dim, sample, out_column, scale


@triton.jit
def _aligned_rows(live, row, dim, sample, out_column, grad_stride, DIM_ALIGN: tl.constexpr):
    """Per contribution: its row's element offset, its dim, and where its bag's gradient row
    starts in grad_out, each promised to be a multiple of DIM_ALIGN (dead lanes: 0)."""
    row = tl.multiple_of(tl.where(live, row, 0), DIM_ALIGN)
    dim = tl.multiple_of(tl.where(live, dim, 0), DIM_ALIGN)
    grad_row = tl.multiple_of(tl.where(live, sample * grad_stride + out_column, 0), DIM_ALIGN)
    return row, dim, grad_row


def run_configs():
    if single_config():
        return [triton.Config({"BLOCK_U": 4, "UNROLL": 2}, num_warps=1)]
    return [triton.Config({"BLOCK_U": u, "UNROLL": r}, num_warps=w)
            for u, r, w in [(16, 2, 4), (32, 2, 4), (32, 1, 8), (64, 1, 8)]]


@triton.jit
def run_tile(u, live, run_start_ptr, run_feature_ptr, long_rank_ptr, meta_ptr, DIM_ALIGN: tl.constexpr):
    """For runs ``u`` (``[BLOCK_U]``): first sorted position, length (0 for a long run, whose
    sum ``_long_run_sums_kernel`` made), the longest length, dim, and rank among long runs (-1)."""
    start = tl.load(run_start_ptr + u, mask=live, other=0)
    long_rank = tl.load(long_rank_ptr + u, mask=live, other=-1)
    length = tl.where(long_rank < 0, tl.load(run_start_ptr + u + 1, mask=live, other=0) - start, 0)
    feature = tl.load(run_feature_ptr + u, mask=live, other=0)
    dim = tl.multiple_of(tl.load(meta_ptr + feature * META_FIELDS + 1, mask=live, other=0), DIM_ALIGN)
    return start, length, tl.max(length, axis=0), dim, long_rank


@triton.jit
def run_sums(start, length, longest, long_rank, cols, mask, grad_out_ptr, item_offset_ptr, item_scale_ptr,
             long_sums_ptr, ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr,
             UNROLL: tl.constexpr):
    """``[BLOCK_U, BLOCK_D]`` fp32: columns ``cols`` of each run's gradient, its contributions
    added in sorted order (a fixed order: the same bits on every run); a long run's comes
    ready-made from ``long_sums``. ``mask`` covers the live runs' columns."""
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    for j in range(0, longest, UNROLL):
        for k in tl.static_range(UNROLL):
            present = (j + k) < length
            item = start + j + k
            offset = tl.multiple_of(tl.load(item_offset_ptr + item, mask=present, other=0), DIM_ALIGN)
            grads = tl.load(grad_out_ptr + offset[:, None] + cols[None, :], mask=present[:, None] & mask, other=0.0)
            if HAS_SCALE:
                grads = grads * tl.load(item_scale_ptr + item, mask=present, other=0.0)[:, None]
            acc += grads
    long_rows = long_rank.to(tl.int64) * ROW_STRIDE
    acc += tl.load(long_sums_ptr + long_rows[:, None] + cols[None, :], mask=(long_rank >= 0)[:, None] & mask,
                   other=0.0)
    return acc


@triton.jit
def _long_run_sums_kernel(
    grad_out_ptr, num_long_ptr, long_runs_ptr, run_start_ptr, run_feature_ptr, item_offset_ptr, item_scale_ptr,
    meta_ptr, long_sums_ptr,
    ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # A hot row's run would hold up its whole tile of runs, one contribution per step; here
    # one program takes a long run BLOCK_Q contributions at a time. Programs take turns over
    # the long runs. One fixed config (no autotuning): the reduction tree of tl.sum depends on
    # the block shape, and the sums must be the same bits in every process.
    num_long = tl.load(num_long_ptr)
    for i in range(tl.program_id(0), num_long, tl.num_programs(0)):
        u = tl.load(long_runs_ptr + i)
        start = tl.load(run_start_ptr + u)
        end = tl.load(run_start_ptr + u + 1)
        dim = tl.multiple_of(tl.load(meta_ptr + tl.load(run_feature_ptr + u) * META_FIELDS + 1), DIM_ALIGN)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for q0 in range(start, end, BLOCK_Q):
                q = q0 + tl.arange(0, BLOCK_Q)
                present = q < end
                offset = tl.multiple_of(tl.load(item_offset_ptr + q, mask=present, other=0), DIM_ALIGN)
                grads = tl.load(grad_out_ptr + offset[:, None] + cols[None, :],
                                mask=present[:, None] & col_mask[None, :], other=0.0)
                if HAS_SCALE:
                    grads = grads * tl.load(item_scale_ptr + q, mask=present, other=0.0)[:, None]
                acc += tl.sum(grads, axis=0)
            # int64: i * ROW_STRIDE can pass 2**31 (i is a plain int under the interpreter)
            tl.store(long_sums_ptr + (i + tl.zeros([], dtype=tl.int64)) * ROW_STRIDE + cols, acc, mask=col_mask)


@triton.autotune(configs=run_configs(), key=["BLOCK_D", "HAS_SCALE", "DIM_ALIGN", "DENSE"])
@triton.jit
def _rows_grad_kernel(
    grad_out_ptr, num_runs_ptr, run_start_ptr, run_row_ptr, run_feature_ptr, item_offset_ptr, item_scale_ptr,
    long_rank_ptr, long_sums_ptr, meta_ptr, dest_ptr,
    DENSE: tl.constexpr, ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr, UNROLL: tl.constexpr,
):
    # programs take turns over tiles of BLOCK_U runs: u0 = pid, pid + G, ... (times BLOCK_U)
    num_runs = tl.load(num_runs_ptr)
    for u0 in range(tl.program_id(0) * BLOCK_U, num_runs, tl.num_programs(0) * BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        live = u < num_runs
        start, length, longest, dim, long_rank = run_tile(u, live, run_start_ptr, run_feature_ptr, long_rank_ptr,
                                                          meta_ptr, DIM_ALIGN)
        if DENSE:  # the row's own place in a [W] gradient
            dest = tl.multiple_of(tl.load(run_row_ptr + u, mask=live, other=0), DIM_ALIGN)
        else:  # row u of a compact [U, ROW_STRIDE] gradient
            dest = u.to(tl.int64) * ROW_STRIDE
        for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = live[:, None] & (cols[None, :] < dim[:, None])
            acc = run_sums(start, length, longest, long_rank, cols, mask, grad_out_ptr, item_offset_ptr,
                           item_scale_ptr, long_sums_ptr, ROW_STRIDE, HAS_SCALE, DIM_ALIGN, UNROLL)
            tl.store(dest_ptr + dest[:, None] + cols[None, :], acc, mask=mask)


@triton.autotune(configs=_q_configs([(16, 2), (32, 4), (64, 8)]), key=["BLOCK_D", "HAS_PSW", "DIM_ALIGN"])
@triton.jit
def _rows_grad_atomic_kernel(
    grad_out_ptr, grad_stride, rows_ptr, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, psw_ptr,
    meta_ptr, dest_ptr, num_contributions, num_values, batch_size, max_dim,
    HAS_PSW: tl.constexpr, DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # one program per BLOCK_Q contributions, in input order
    c = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row = tl.load(rows_ptr + c, mask=c < num_contributions, other=-1)
    live = row >= 0
    dim, sample, out_column, scale = _contribution_scale(
        c, live, num_values, batch_size, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr,
        HAS_PSW)
    row, dim, grad_row = _aligned_rows(live, row, dim, sample, out_column, grad_stride, DIM_ALIGN)
    for d0 in range(0, max_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < dim[:, None])
        grads = tl.load(grad_out_ptr + grad_row[:, None] + cols[None, :], mask=mask, other=0.0)
        # relaxed: sums need no ordering with other memory, and acq_rel would fence every add
        tl.atomic_add(dest_ptr + row[:, None] + cols[None, :], grads * scale[:, None], mask=mask, sem="relaxed")


@triton.autotune(configs=_q_configs([(16, 2), (32, 4), (64, 8)]), key=["BLOCK_D", "DIM_ALIGN"])
@triton.jit
def _psw_grad_kernel(
    grad_out_ptr, grad_stride, weights_ptr, rows_ptr, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr,
    meta_ptr, out_ptr, num_contributions, num_values, batch_size, max_dim,
    DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # one program per BLOCK_Q contributions: d(out)/d(psw) is the row itself, MEAN-scaled
    c = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_range = c < num_contributions
    row = tl.load(rows_ptr + c, mask=in_range, other=-1)
    live = row >= 0
    dim, sample, out_column, scale = _contribution_scale(
        c, live, num_values, batch_size, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, offsets_ptr, meta_ptr,
        False)
    row, dim, grad_row = _aligned_rows(live, row, dim, sample, out_column, grad_stride, DIM_ALIGN)
    dot = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for d0 in range(0, max_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < dim[:, None])
        grads = tl.load(grad_out_ptr + grad_row[:, None] + cols[None, :], mask=mask, other=0.0)
        rows = tl.load(weights_ptr + row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(grads * rows, axis=1)
    tl.store(out_ptr + c, dot * scale, mask=in_range)


class Runs(NamedTuple):
    """Contributions sorted by row. Run ``u < num_runs`` spans sorted positions
    ``run_start[u]:run_start[u+1]``; masked contributions (row -1) sort first, in no run.
    Per-run tensors are sized ``M`` (the contribution count), since the run count stays on
    the device; entries from ``num_runs`` on are never read."""

    num_runs: torch.Tensor     # [1] int64: read by the kernels, never by the host
    run_start: torch.Tensor    # [M+2] int64; slots num_runs.. hold M
    run_row: torch.Tensor      # [M] int64 element offset of each run's row in the flat weights
    run_feature: torch.Tensor  # [M] int64 a feature reading the run's row (its table gives dim, state)
    item_offset: torch.Tensor  # [M] int64 element of grad_out where each sorted contribution's bag row starts
    item_scale: Optional[torch.Tensor]  # [M] fp32 per-sample weight times MEAN's 1/length; None: all 1
    long_rank: torch.Tensor    # [M] int64 rank of each run among the long runs, -1 for the others
    long_runs: torch.Tensor    # [M+1] int64 the long runs, in order (the first num_long entries)
    num_long: torch.Tensor     # [1] int64 runs of more than LONG_RUN contributions


# Runs of more than this many contributions (hot rows) are summed by _long_run_sums_kernel.
LONG_RUN = 32


def sort_runs(rows: torch.Tensor, contrib_feature: torch.Tensor, bag_of_value: torch.Tensor, offsets: torch.Tensor,
              per_sample_weights: Optional[torch.Tensor], meta: torch.Tensor, batch_size: int, grad_stride: int,
              any_mean: bool, narrow_keys: bool) -> Runs:
    """Sort ``[M]`` contribution rows into runs, with static shapes and no host sync.

    Args:
        rows: ``[M]`` element offset of each contribution's row, -1 when masked.
        contrib_feature: ``[M]`` int32 feature of each contribution, -1 when masked.
        bag_of_value: ``[N]`` key-major bag (``k*B + b``) of each id.
        offsets: ``[K*B+1]`` bag starts.
        per_sample_weights: ``[N]`` or None.
        meta: ``[F, META_FIELDS]`` int64 feature metadata (see ``common``).
        grad_stride: row stride of the ``[B, total_dim]`` output gradient.
        any_mean: some feature pools by MEAN.
        narrow_keys: every row offset is below 2**31 (sort int32 keys).
    """
    num = rows.shape[0]
    num_values = bag_of_value.shape[0]
    # 32-bit keys when every row offset fits: a radix sort then needs half the passes
    keys = rows.to(torch.int32) if narrow_keys else rows
    sorted_rows, order = torch.sort(keys, stable=True)
    previous = torch.nn.functional.pad(sorted_rows, (1, 0), value=-1)[:-1]
    is_start = (sorted_rows >= 0) & (sorted_rows != previous)
    slot = torch.cumsum(is_start, 0) - 1
    run_start = torch.full((num + 2,), num, dtype=torch.int64, device=rows.device)
    # non-starts all write to the spare last slot, which nobody reads
    run_start.index_put_((torch.where(is_start, slot, num + 1),), torch.arange(num, device=rows.device))
    first = run_start[:num].clamp(max=num - 1)  # past num_runs: any valid position
    sorted_feature = contrib_feature.index_select(0, order).long().clamp(min=0)
    value = order % num_values
    bag = bag_of_value.index_select(0, value)
    item_offset = (bag % batch_size) * grad_stride + meta[sorted_feature, 3]
    scale = None if per_sample_weights is None else per_sample_weights.index_select(0, value).float()
    if any_mean:
        lengths = (offsets[1:] - offsets[:-1]).index_select(0, bag)
        inverse = torch.where(meta[sorted_feature, 5] != 0, 1.0 / lengths.clamp(min=1).float(), 1.0)
        scale = inverse if scale is None else scale * inverse
    is_long = (run_start[1:num + 1] - run_start[:num]) > LONG_RUN  # past num_runs: length 0
    long_rank = torch.where(is_long, torch.cumsum(is_long, 0) - 1, -1)
    long_runs = torch.zeros(num + 1, dtype=torch.int64, device=rows.device)
    long_runs.index_put_((torch.where(is_long, long_rank, num),), torch.arange(num, device=rows.device))
    return Runs(is_start.sum(dtype=torch.int64).reshape(1), run_start, sorted_rows.index_select(0, first).long(),
                sorted_feature.index_select(0, first), item_offset, scale, long_rank, long_runs,
                is_long.sum(dtype=torch.int64).reshape(1))


def long_run_sums(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, max_dim: int, alignment: int) -> torch.Tensor:
    """``[M // (LONG_RUN+1) + 1, max_dim]`` fp32: row ``i`` is the ``i``-th long run's gradient."""
    num = runs.item_offset.shape[0]
    sums = torch.empty((num // (LONG_RUN + 1) + 1, max_dim), dtype=torch.float32, device=grad_out.device)
    scale = runs.item_scale
    wrap_triton(_long_run_sums_kernel)[(persistent_programs(grad_out.device),)](
        grad_out, runs.num_long, runs.long_runs, runs.run_start, runs.run_feature, runs.item_offset,
        scale if scale is not None else grad_out, meta, sums,
        ROW_STRIDE=max_dim, HAS_SCALE=scale is not None, DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim),
        BLOCK_Q=8 if single_config() else 32, num_warps=1 if single_config() else 4)
    return sums


def rows_grad(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, dest: torch.Tensor, dense: bool, max_dim: int,
              alignment: int) -> None:
    """Deterministic row gradients: each touched row's sum, written once.

    Args:
        grad_out: ``[B, total_dim]`` fp32 contiguous (the rows ``runs.item_offset`` points into).
        runs: the contributions sorted by row (:func:`sort_runs`).
        meta: ``[F, META_FIELDS]`` int64 feature metadata.
        dest: fp32. ``dense``: ``[W]``, row gradients land at their element offsets.
            Otherwise ``[M, max_dim]``: run ``u`` lands in row ``u``.
        alignment: a power of two dividing every dim, table offset and output column.
    """
    num = runs.item_offset.shape[0]
    if statically_known_true(num == 0):
        return
    scale = runs.item_scale
    long_sums = long_run_sums(grad_out, runs, meta, max_dim, alignment)
    wrap_triton(_rows_grad_kernel)[(persistent_programs(grad_out.device),)](
        grad_out, runs.num_runs, runs.run_start, runs.run_row, runs.run_feature, runs.item_offset,
        scale if scale is not None else grad_out, runs.long_rank, long_sums, meta, dest,
        DENSE=dense, ROW_STRIDE=max_dim, HAS_SCALE=scale is not None, DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim))


def rows_grad_atomic(grad_out: torch.Tensor, rows: torch.Tensor, contrib_feature: torch.Tensor,
                     bag_of_value: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
                     meta: torch.Tensor, dest: torch.Tensor, max_dim: int, alignment: int) -> None:
    """Row gradients by ``atomic_add`` into ``dest`` (``[W]`` fp32, zeroed): fast, order not fixed.

    Args as in :func:`rows_grad`, with ``rows`` the unsorted ``[M]`` contribution rows.
    """
    if statically_known_true(rows.numel() == 0):
        return
    grid = lambda cfg: (triton.cdiv(rows.numel(), cfg["BLOCK_Q"]),)  # noqa: E731
    wrap_triton(_rows_grad_atomic_kernel)[grid](
        grad_out, grad_out.stride(0), rows, contrib_feature, bag_of_value, offsets,
        per_sample_weights if per_sample_weights is not None else grad_out, meta, dest,
        rows.numel(), bag_of_value.numel(), grad_out.shape[0], max_dim,
        HAS_PSW=per_sample_weights is not None, DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim))


def psw_grad(grad_out: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, contrib_feature: torch.Tensor,
             bag_of_value: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor, out: torch.Tensor,
             max_dim: int, alignment: int) -> None:
    """``out[c]`` = (row of contribution c) . (its bag's output gradient), MEAN-scaled; 0 if masked.

    Args as in :func:`rows_grad`; ``weights`` ``[W]``; ``out`` ``[M]`` fp32.
    """
    if statically_known_true(rows.numel() == 0):
        return
    grid = lambda cfg: (triton.cdiv(rows.numel(), cfg["BLOCK_Q"]),)  # noqa: E731
    wrap_triton(_psw_grad_kernel)[grid](
        grad_out, grad_out.stride(0), weights, rows, contrib_feature, bag_of_value, offsets, meta, out,
        rows.numel(), bag_of_value.numel(), grad_out.shape[0], max_dim, DIM_ALIGN=alignment,
        BLOCK_D=block_d(max_dim))
