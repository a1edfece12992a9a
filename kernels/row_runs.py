"""Contributions sorted by row into runs, and the kernels that sum the runs.

Sorted by row (by the op layer's ``runs_triton.sorted_runs``), the contributions (see
``pooled_bwd``) form *runs* of equal rows (:class:`Runs`), and a run's gradient is a bag in
the forward's sense: the sum, over its contributions, of their bags' output-gradient rows
times a factor (per-sample weight, 1/length for MEAN). So the deterministic backward is the
forward's gather-and-sum again, over runs instead of bags: ``BLOCK_U`` runs per program
advance together, one contribution each per step, so that many independent row loads are in
flight even though most runs hold one or two contributions; each run is summed in sorted
order, which gives the same bits on every run. Runs of more than ``LONG_RUN`` contributions
(hot rows) would hold up their tile, so ``_long_run_sums_kernel`` sums them first, a block of
contributions at a time.

* ``_rows_grad_kernel``: per run, its sum, written once (dense, or compact for the sparse
  gradient).
* ``pooled_fused`` applies the fused optimizers to the same run sums (``run_tile``,
  ``run_sums``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
import triton.language as tl

from . import legacy_loops
from .common import META_DIM, META_FIELDS, block_d, persistent_programs, single_config, wrap_triton
from .tuning import autotune


def run_configs():
    if single_config():
        return [triton.Config({"BLOCK_U": 4, "UNROLL": 2}, num_warps=1)]
    # no 16-run tiles: triton 3.6 (the GPU machines') fails to lay out the run sums' loop at 16
    return [triton.Config({"BLOCK_U": u, "UNROLL": r}, num_warps=w)
            for u, r, w in [(32, 2, 4), (32, 1, 8), (64, 1, 8)]]


def rows_grad_configs():
    """``_rows_grad_kernel``'s: ``run_configs``' with two steps of 32 runs on 8 warps instead
    of 4. At 4 warps a thread holds 64 floats of each stage's rows at dim 128, and ptxas ran out
    of registers (255, spills; inside the run loop with per-item scales, and 2 round trips per
    step on triton 3.6). The sums are the same bits at every config."""
    return [triton.Config(c.kwargs, num_warps=8 if c.kwargs["UNROLL"] == 2 and not single_config() else c.num_warps)
            for c in run_configs()]


@triton.jit
def run_tile(u0, num_runs, run_start_ptr, run_feature_ptr, long_rank_ptr, meta_ptr, DIM_ALIGN: tl.constexpr,
             BLOCK_U: tl.constexpr):
    """The tile of runs ``u = u0 .. u0+BLOCK_U-1``: ``u``, which are live (``u < num_runs``),
    first sorted position, length (0 for a long run, whose sum ``_long_run_sums_kernel``
    made), the longest length, dim, and rank among long runs (-1)."""
    u = u0 + tl.arange(0, BLOCK_U)
    live = u < num_runs
    start = tl.load(run_start_ptr + u, mask=live, other=0)
    long_rank = tl.load(long_rank_ptr + u, mask=live, other=-1)
    length = tl.where(long_rank < 0, tl.load(run_start_ptr + u + 1, mask=live, other=0) - start, 0)
    feature = tl.load(run_feature_ptr + u, mask=live, other=0)
    dim = tl.multiple_of(tl.load(meta_ptr + feature * META_FIELDS + META_DIM, mask=live, other=0), DIM_ALIGN)
    return u, live, start, length, tl.max(length, axis=0), dim, long_rank


@triton.jit
def _run_offsets(item_offset_ptr, start, length, position, UNROLL: tl.constexpr):
    """The grad_out offsets of sorted positions ``position .. position+UNROLL-1`` of each run,
    ``UNROLL`` ``[BLOCK_U]`` int64 tensors; -1 past a run's end."""
    out = ()
    for k in tl.static_range(UNROLL):
        out = out + (tl.load(item_offset_ptr + start + (position + k), mask=(position + k) < length, other=-1),)
    return out


@triton.jit
def _run_rows(offsets, start, length, position, cols, mask, grad_out_ptr, item_scale_ptr, HAS_SCALE: tl.constexpr,
              DIM_ALIGN: tl.constexpr, UNROLL: tl.constexpr):
    """Columns ``cols`` of the gradient rows at ``offsets`` (0 where -1), ``UNROLL`` ``[BLOCK_U,
    BLOCK_D]`` fp32 tensors, and their scales (1 without HAS_SCALE)."""
    rows = ()
    scales = ()
    for k in tl.static_range(UNROLL):
        if UNROLL == 1:
            # where the offset is not -1, said by the position and not by the loaded offset: LLVM
            # unrolled this loop 4 times and carried the offset's compare, computed (and waited
            # for) in the iteration that loaded it (triton 3.6 and 3.9; at UNROLL=2, not unrolled,
            # the position's compare took the registers of a spill in the fused SGD step)
            present = (position + k) < length
        else:
            present = offsets[k] >= 0
        # the promise holds for every lane that loads (a masked lane's -1 is never used);
        # made on the row pointers, as a promise on loop-carried offsets is lost
        row_ptrs = tl.multiple_of(grad_out_ptr + offsets[k], DIM_ALIGN)
        rows = rows + (tl.load(row_ptrs[:, None] + cols[None, :], mask=present[:, None] & mask, other=0.0),)
        if HAS_SCALE:
            scales = scales + (tl.load(item_scale_ptr + start + (position + k), mask=present, other=0.0),)
        else:
            scales = scales + (1.0,)
    return rows, scales


@triton.jit
def run_sums(start, length, longest, long_rank, cols, mask, grad_out_ptr, item_offset_ptr, item_scale_ptr,
             long_sums_ptr, ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr,
             UNROLL: tl.constexpr, LEGACY_LOOPS: tl.constexpr):
    """``[BLOCK_U, BLOCK_D]`` fp32: columns ``cols`` of each run's gradient, its contributions
    added in sorted order (a fixed order: the same bits on every run); a long run's comes
    ready-made from ``long_sums``. ``mask`` covers the live runs' columns.

    The loop is pipelined two deep (below), so that it waits for one DRAM round trip per
    step where loading each offset just before its row cost two or more: ptxas gave later
    loads the registers of rows still in flight, which then had to come back first (seen
    with ``codegen_report``)."""
    # start from the long runs' sums (a long run has length 0 here, every other run loads 0):
    # added after the loop instead, the same sum, triton 3.6 could not lay the loop out
    long_rows = long_rank.to(tl.int64) * ROW_STRIDE
    acc = tl.load(long_sums_ptr + long_rows[:, None] + cols[None, :], mask=(long_rank >= 0)[:, None] & mask,
                  other=0.0)
    if LEGACY_LOOPS:
        acc = legacy_loops.run_sums(acc, start, length, longest, cols, mask, grad_out_ptr, item_offset_ptr,
                                    item_scale_ptr, HAS_SCALE, DIM_ALIGN, UNROLL)
    else:
        # two stages: an iteration adds the gradient rows loaded by the one before, while it
        # loads the next step's rows and the offsets of the step after; no load is waited for
        # in the iteration that issues it, whatever registers ptxas gives them
        ahead = _run_offsets(item_offset_ptr, start, length, 0, UNROLL)
        rows_next, scales_next = _run_rows(ahead, start, length, 0, cols, mask, grad_out_ptr, item_scale_ptr,
                                           HAS_SCALE, DIM_ALIGN, UNROLL)
        ahead = _run_offsets(item_offset_ptr, start, length, UNROLL, UNROLL)
        for j in range(0, longest, UNROLL):
            rows_now = rows_next
            scales_now = scales_next
            offsets_next = ahead
            ahead = _run_offsets(item_offset_ptr, start, length, j + 2 * UNROLL, UNROLL)
            rows_next, scales_next = _run_rows(offsets_next, start, length, j + UNROLL, cols, mask, grad_out_ptr,
                                               item_scale_ptr, HAS_SCALE, DIM_ALIGN, UNROLL)
            for k in tl.static_range(UNROLL):
                if HAS_SCALE:
                    acc += rows_now[k] * scales_now[k][:, None]
                else:
                    acc += rows_now[k]
    return acc


def _long_run_config():
    # one config, not a search: the reduction tree of tl.sum depends on the block shape, and
    # the sums must be the same bits in every process
    if single_config():
        return [triton.Config({"BLOCK_Q": 8}, num_warps=1)]
    return [triton.Config({"BLOCK_Q": 32}, num_warps=4)]


@triton.jit
def _long_run_block(q, end, item_offset_ptr, item_scale_ptr, HAS_SCALE: tl.constexpr):
    """Sorted positions ``q`` (``[BLOCK_Q]``) of a long run ending at ``end``: their grad_out
    offsets (0 past the end) and scales (0 past the end; 1 without HAS_SCALE)."""
    present = q < end
    offset = tl.load(item_offset_ptr + q, mask=present, other=0)
    if HAS_SCALE:
        scale = tl.load(item_scale_ptr + q, mask=present, other=0.0)
    else:
        scale = tl.full(q.shape, 1.0, tl.float32)
    return offset, scale


@triton.jit
def _long_run_rows(grad_out_ptr, offset, present, cols, col_mask, DIM_ALIGN: tl.constexpr):
    """``[BLOCK_Q, BLOCK_D]`` fp32: columns ``cols`` of the gradient rows at ``offset`` (0 where
    not ``present``)."""
    # the promise made on the row pointers: one on loop-carried offsets is lost
    row_ptrs = tl.multiple_of(grad_out_ptr + offset, DIM_ALIGN)
    return tl.load(row_ptrs[:, None] + cols[None, :], mask=present[:, None] & col_mask[None, :], other=0.0)


@autotune(configs=_long_run_config(), key=["BLOCK_D"])
@triton.jit
def _long_run_sums_kernel(
    grad_out_ptr, num_long_ptr, long_runs_ptr, run_start_ptr, run_feature_ptr, item_offset_ptr, item_scale_ptr,
    meta_ptr, long_sums_ptr,
    ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    LEGACY_LOOPS: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # A hot row's run would hold up its whole tile of runs, one contribution per step; here
    # one program takes a long run BLOCK_Q contributions at a time. Programs take turns over
    # the long runs.
    num_long = tl.load(num_long_ptr)
    for i in range(tl.program_id(0), num_long, tl.num_programs(0)):
        u = tl.load(long_runs_ptr + i)
        start = tl.load(run_start_ptr + u)
        end = tl.load(run_start_ptr + u + 1)
        dim = tl.multiple_of(tl.load(meta_ptr + tl.load(run_feature_ptr + u) * META_FIELDS + META_DIM), DIM_ALIGN)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            if LEGACY_LOOPS:
                acc = legacy_loops.long_run_sum(acc, start, end, cols, col_mask, grad_out_ptr, item_offset_ptr,
                                                item_scale_ptr, HAS_SCALE, DIM_ALIGN, BLOCK_Q)
            else:
                # three stages: an iteration adds the gradient rows that the one before loaded,
                # loads the next block's rows, whose offsets (and scales) came the iteration before,
                # and the offsets of the block after. Loaded just before their rows, and the rows
                # just before their sum, they cost 5-7 round trips per block (read with
                # codegen_report). The same blocks, added in the same order
                q = start + tl.arange(0, BLOCK_Q)
                offset, scale_next = _long_run_block(q, end, item_offset_ptr, item_scale_ptr, HAS_SCALE)
                rows_next = _long_run_rows(grad_out_ptr, offset, q < end, cols, col_mask, DIM_ALIGN)
                offset_next, scale_after = _long_run_block(q + BLOCK_Q, end, item_offset_ptr, item_scale_ptr, HAS_SCALE)
                for q0 in range(start, end, BLOCK_Q):
                    grads = rows_next
                    scale = scale_next
                    q_next = q0 + BLOCK_Q + tl.arange(0, BLOCK_Q)
                    rows_next = _long_run_rows(grad_out_ptr, offset_next, q_next < end, cols, col_mask, DIM_ALIGN)
                    scale_next = scale_after
                    offset_next, scale_after = _long_run_block(q_next + BLOCK_Q, end, item_offset_ptr, item_scale_ptr,
                                                               HAS_SCALE)
                    if HAS_SCALE:
                        grads = grads * scale[:, None]
                    acc += tl.sum(grads, axis=0)
            # int64: i * ROW_STRIDE can pass 2**31 (i is a plain int under the interpreter)
            tl.store(long_sums_ptr + (i + tl.zeros([], dtype=tl.int64)) * ROW_STRIDE + cols, acc, mask=col_mask)


@autotune(configs=rows_grad_configs(), key=["BLOCK_D", "HAS_SCALE", "DIM_ALIGN", "DENSE"])
@triton.jit
def _rows_grad_kernel(
    grad_out_ptr, num_runs_ptr, run_start_ptr, run_row_ptr, run_feature_ptr, item_offset_ptr, item_scale_ptr,
    long_rank_ptr, long_sums_ptr, meta_ptr, dest_ptr,
    DENSE: tl.constexpr, ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, LEGACY_LOOPS: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_U: tl.constexpr,
    UNROLL: tl.constexpr,
):
    # programs take turns over tiles of BLOCK_U runs: u0 = pid, pid + G, ... (times BLOCK_U)
    num_runs = tl.load(num_runs_ptr)
    for u0 in range(tl.program_id(0) * BLOCK_U, num_runs, tl.num_programs(0) * BLOCK_U):
        u, live, start, length, longest, dim, long_rank = run_tile(
            u0, num_runs, run_start_ptr, run_feature_ptr, long_rank_ptr, meta_ptr, DIM_ALIGN, BLOCK_U)
        if DENSE:  # the row's own place in a [W] gradient
            dest = tl.multiple_of(tl.load(run_row_ptr + u, mask=live, other=0), DIM_ALIGN)
        else:  # row u of a compact [U, ROW_STRIDE] gradient
            dest = u.to(tl.int64) * ROW_STRIDE
        if ONE_TILE:
            # every dim fits one tile: no loop over column tiles, whose invariants (the run
            # offsets' addresses, the scales) ptxas otherwise kept live across it, at 255
            # registers and spills in the run loop with per-item scales (32 runs x 2 steps)
            _rows_grad_tile(0, live, start, length, longest, long_rank, dim, dest, grad_out_ptr, item_offset_ptr,
                            item_scale_ptr, long_sums_ptr, dest_ptr, ROW_STRIDE, HAS_SCALE, DIM_ALIGN, BLOCK_D,
                            UNROLL, LEGACY_LOOPS)
        else:
            for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                _rows_grad_tile(d0, live, start, length, longest, long_rank, dim, dest, grad_out_ptr,
                                item_offset_ptr, item_scale_ptr, long_sums_ptr, dest_ptr, ROW_STRIDE, HAS_SCALE,
                                DIM_ALIGN, BLOCK_D, UNROLL, LEGACY_LOOPS)


@triton.jit
def _rows_grad_tile(d0, live, start, length, longest, long_rank, dim, dest, grad_out_ptr, item_offset_ptr,
                    item_scale_ptr, long_sums_ptr, dest_ptr, ROW_STRIDE: tl.constexpr, HAS_SCALE: tl.constexpr,
                    DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
                    LEGACY_LOOPS: tl.constexpr):
    """Columns ``d0 .. d0+BLOCK_D-1`` of a tile of runs' gradients, summed and stored at ``dest``."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = live[:, None] & (cols[None, :] < dim[:, None])
    acc = run_sums(start, length, longest, long_rank, cols, mask, grad_out_ptr, item_offset_ptr,
                   item_scale_ptr, long_sums_ptr, ROW_STRIDE, HAS_SCALE, DIM_ALIGN, UNROLL, LEGACY_LOOPS)
    tl.store(dest_ptr + dest[:, None] + cols[None, :], acc, mask=mask)


class Runs(NamedTuple):
    """Contributions sorted by row. Run ``u < num_runs`` spans sorted positions
    ``run_start[u]:run_start[u+1]``; masked contributions (row -1) sort first, in no run.
    Per-run tensors are sized ``M`` (the contribution count), since the run count stays on
    the device; entries from ``num_runs`` on are never read."""

    num_runs: torch.Tensor     # [1] int64: read by the kernels, never by the host
    run_start: torch.Tensor    # [M+1] or more int64; slots num_runs..M hold M, any past M are scratch
    run_row: torch.Tensor      # [M] int64 element offset of each run's row in the flat weights
    run_feature: torch.Tensor  # [M] int64 a feature reading the run's row (its table gives dim, state)
    item_offset: torch.Tensor  # [M] int64 element of grad_out where each sorted contribution's gradient row starts
    item_scale: Optional[torch.Tensor]  # [M] fp32 per-sample weight times MEAN's 1/length; None: all 1
    long_rank: torch.Tensor    # [M] int64 rank of each run among the long runs, -1 for the others
    long_runs: torch.Tensor    # [M] or more int64: the long runs, in order (the first num_long entries)
    num_long: torch.Tensor     # [1] int64 runs of more than LONG_RUN contributions


# Runs of more than this many contributions (hot rows) are summed by _long_run_sums_kernel.
LONG_RUN = 32


def long_run_sums(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, max_dim: int, alignment: int) -> torch.Tensor:
    """``[M // (LONG_RUN+1) + 1, max_dim]`` fp32: row ``i`` is the ``i``-th long run's gradient."""
    num = runs.item_offset.shape[0]
    sums = torch.empty((num // (LONG_RUN + 1) + 1, max_dim), dtype=torch.float32, device=grad_out.device)
    scale = runs.item_scale
    wrap_triton(_long_run_sums_kernel)[(persistent_programs(grad_out.device),)](
        grad_out, runs.num_long, runs.long_runs, runs.run_start, runs.run_feature, runs.item_offset,
        scale if scale is not None else grad_out, meta, sums,
        ROW_STRIDE=max_dim, HAS_SCALE=scale is not None, DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim),
        LEGACY_LOOPS=legacy_loops.enabled())
    return sums


def rows_grad(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, dest: torch.Tensor, dense: bool, max_dim: int,
              alignment: int) -> None:
    """Deterministic row gradients: each touched row's sum, written once.

    Args:
        grad_out: fp32 contiguous output gradient (the rows ``runs.item_offset`` points into).
        runs: the contributions sorted by row (the op layer's ``runs_triton.sorted_runs``).
        meta: ``[F, META_FIELDS]`` int64 feature metadata.
        dest: fp32. ``dense``: ``[W]``, row gradients land at their element offsets.
            Otherwise ``[M, max_dim]``: run ``u`` lands in row ``u``.
        alignment: a power of two dividing every dim, table offset and output column.
    """
    if statically_known_true(runs.item_offset.shape[0] == 0):
        return
    args, constants = launch_args(grad_out, runs, meta, max_dim, alignment)
    wrap_triton(_rows_grad_kernel)[(persistent_programs(grad_out.device),)](
        *args, dest, DENSE=dense, ONE_TILE=max_dim <= constants["BLOCK_D"], **constants)


def launch_args(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, max_dim: int, alignment: int):
    """What every run-tile kernel takes first: the run tensors (after summing the long runs),
    and the constexprs ``ROW_STRIDE``, ``HAS_SCALE``, ``DIM_ALIGN``, ``BLOCK_D``, ``LEGACY_LOOPS``."""
    scale = runs.item_scale
    long_sums = long_run_sums(grad_out, runs, meta, max_dim, alignment)
    args = (grad_out, runs.num_runs, runs.run_start, runs.run_row, runs.run_feature, runs.item_offset,
            scale if scale is not None else grad_out, runs.long_rank, long_sums, meta)
    return args, dict(ROW_STRIDE=max_dim, HAS_SCALE=scale is not None, DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim),
                      LEGACY_LOOPS=legacy_loops.enabled())
