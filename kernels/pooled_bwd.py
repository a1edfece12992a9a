"""Backward of pooled embedding bags.

The op lists every (feature, id) pair as a *contribution* ``c`` in ``[0, P*N)``: id
``c % N`` as read by the feature of pass ``c // N`` (a pass holds each KJT key at most once;
a key read by two tables needs two passes). For each contribution it precomputes, with
plain torch ops and no host sync:

* ``contrib_feature[c]``: the feature, or -1 when the id is not read in that pass or is
  outside its table (such ids were skipped in the forward, so they get no gradient);
* ``contrib_row[c]``: element offset of the id's row in the flat weights (-1 when masked).

Three kernels consume them:

* ``_rows_grad_kernel``, deterministic: contributions sorted by row; on a persistent grid,
  programs take turns over the runs of equal rows, sum each run in sorted order and write
  the row once.
* ``_rows_grad_atomic_kernel``, fast: contributions in any order, ``atomic_add`` into rows.
* ``_psw_grad_kernel``: per contribution, the dot of its row with its bag's output gradient.
"""

from __future__ import annotations

from typing import NamedTuple

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


@triton.autotune(configs=_q_configs([(16, 2), (32, 4), (64, 4)]), key=["BLOCK_D", "HAS_PSW"])
@triton.jit
def _rows_grad_kernel(
    grad_out_ptr, grad_stride, sorted_rows_ptr, order_ptr, run_start_ptr, run_end_ptr, num_runs_ptr,
    contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr, dest_ptr,
    num_values, batch_size,
    DENSE: tl.constexpr, DEST_STRIDE: tl.constexpr, HAS_PSW: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # persistent grid: programs take turns over the runs of equal rows, u = pid, pid + G, ...
    num_runs = tl.load(num_runs_ptr)
    for u in range(tl.program_id(0), num_runs, tl.num_programs(0)):
        p = tl.load(run_start_ptr + u)
        row = tl.load(sorted_rows_ptr + p)
        end = tl.load(run_end_ptr + p)
        dim = tl.load(meta_ptr + tl.load(contrib_feature_ptr + tl.load(order_ptr + p)).to(tl.int64) * META_FIELDS + 1)
        if DENSE:
            dest = dest_ptr + row
        else:
            dest = dest_ptr + u * DEST_STRIDE
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            acc = sum_run(p, end, cols, cols < dim, grad_out_ptr, grad_stride, order_ptr, contrib_feature_ptr,
                          bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr, num_values, batch_size,
                          HAS_PSW, BLOCK_Q)
            tl.store(dest + cols, acc, mask=cols < dim)


@triton.jit
def sum_run(p, end, cols, col_mask, grad_out_ptr, grad_stride, order_ptr, contrib_feature_ptr, bag_of_value_ptr,
            offsets_ptr, psw_ptr, meta_ptr, num_values, batch_size, HAS_PSW: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``[BLOCK_D]`` fp32: columns ``cols`` of the gradient summed over sorted contributions
    ``p..end-1`` (one row's run), in a fixed order, so the sum is the same on every run."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for q0 in range(p, end, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        in_run = q < end
        c = tl.load(order_ptr + q, mask=in_run, other=0)
        _, sample, out_column, scale = _contribution_scale(
            c, in_run, num_values, batch_size, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr,
            psw_ptr, meta_ptr, HAS_PSW)
        grads = tl.load(grad_out_ptr + sample[:, None] * grad_stride + out_column[:, None] + cols[None, :],
                        mask=in_run[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(grads * scale[:, None], axis=0)
    return acc


@triton.autotune(configs=_q_configs([(16, 2), (32, 4), (64, 8)]), key=["BLOCK_D", "HAS_PSW"])
@triton.jit
def _rows_grad_atomic_kernel(
    grad_out_ptr, grad_stride, rows_ptr, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, psw_ptr,
    meta_ptr, dest_ptr, num_contributions, num_values, batch_size, max_dim,
    HAS_PSW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # one program per BLOCK_Q contributions, in input order
    c = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row = tl.load(rows_ptr + c, mask=c < num_contributions, other=-1)
    live = row >= 0
    dim, sample, out_column, scale = _contribution_scale(
        c, live, num_values, batch_size, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr,
        HAS_PSW)
    for d0 in range(0, max_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < dim[:, None])
        grads = tl.load(grad_out_ptr + sample[:, None] * grad_stride + out_column[:, None] + cols[None, :],
                        mask=mask, other=0.0)
        tl.atomic_add(dest_ptr + row[:, None] + cols[None, :], grads * scale[:, None], mask=mask)


@triton.autotune(configs=_q_configs([(16, 2), (32, 4), (64, 8)]), key=["BLOCK_D"])
@triton.jit
def _psw_grad_kernel(
    grad_out_ptr, grad_stride, weights_ptr, rows_ptr, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr,
    meta_ptr, out_ptr, num_contributions, num_values, batch_size, max_dim,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # one program per BLOCK_Q contributions: d(out)/d(psw) is the row itself, MEAN-scaled
    c = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_range = c < num_contributions
    row = tl.load(rows_ptr + c, mask=in_range, other=-1)
    live = row >= 0
    dim, sample, out_column, scale = _contribution_scale(
        c, live, num_values, batch_size, contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, offsets_ptr, meta_ptr,
        False)
    dot = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for d0 in range(0, max_dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < dim[:, None])
        grads = tl.load(grad_out_ptr + sample[:, None] * grad_stride + out_column[:, None] + cols[None, :],
                        mask=mask, other=0.0)
        rows = tl.load(weights_ptr + row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(grads * rows, axis=1)
    tl.store(out_ptr + c, dot * scale, mask=in_range)


class Runs(NamedTuple):
    """Contributions sorted by row, and where each run of equal rows starts and ends."""

    sorted_rows: torch.Tensor  # [M] int64 row element offsets, ascending; -1 (masked) first
    order: torch.Tensor        # [M] int64 contribution index of each sorted entry
    run_start: torch.Tensor    # [M+1] int64 sorted position of run u's first entry (u < num_runs)
    run_end: torch.Tensor      # [M] int64 end of the run each sorted entry belongs to
    num_runs: torch.Tensor     # [1] int64 on the device: read by the kernels, never by the host
    is_start: torch.Tensor     # [M] bool


def sort_runs(rows: torch.Tensor) -> Runs:
    """Sort ``[M]`` contribution rows (-1 = masked) into runs, with static shapes and no host sync."""
    num = rows.shape[0]
    sorted_rows, order = torch.sort(rows, stable=True)
    run_end = torch.searchsorted(sorted_rows, sorted_rows, right=True)
    previous = torch.nn.functional.pad(sorted_rows, (1, 0), value=-1)[:-1]
    is_start = (sorted_rows >= 0) & (sorted_rows != previous)
    slot = torch.cumsum(is_start, 0) - 1
    # non-starts all write to the spare slot M, which nobody reads
    run_start = torch.zeros(num + 1, dtype=torch.int64, device=rows.device)
    run_start.index_put_((torch.where(is_start, slot, num),), torch.arange(num, device=rows.device))
    return Runs(sorted_rows, order, run_start, run_end, is_start.sum(dtype=torch.int64).reshape(1), is_start)


def rows_grad(grad_out: torch.Tensor, runs: Runs, contrib_feature: torch.Tensor, bag_of_value: torch.Tensor,
              offsets: torch.Tensor, per_sample_weights: torch.Tensor | None, meta: torch.Tensor,
              dest: torch.Tensor, dense: bool, max_dim: int) -> None:
    """Deterministic row gradients: each touched row's sum, written once.

    Args:
        grad_out: ``[B, total_dim]`` fp32 contiguous.
        runs: the contributions sorted by row (:func:`sort_runs`).
        contrib_feature: ``[M]`` int32 feature of each contribution (by contribution index).
        bag_of_value: ``[N]`` bag (key-major ``k*B + b``) of each id.
        offsets: ``[K*B+1]`` bag starts.
        per_sample_weights: ``[N]`` or None.
        meta: ``[F, META_FIELDS]`` int64 feature metadata (see ``common``).
        dest: fp32. ``dense``: ``[W]``, row gradients land at their element offsets.
            Otherwise ``[U, max_dim]``: run ``u`` lands in row ``u``.
    """
    if statically_known_true(runs.sorted_rows.numel() == 0):
        return
    wrap_triton(_rows_grad_kernel)[(persistent_programs(grad_out.device),)](
        grad_out, grad_out.stride(0), runs.sorted_rows, runs.order, runs.run_start, runs.run_end, runs.num_runs,
        contrib_feature, bag_of_value, offsets, per_sample_weights if per_sample_weights is not None else grad_out,
        meta, dest, bag_of_value.numel(), grad_out.shape[0],
        DENSE=dense, DEST_STRIDE=max_dim, HAS_PSW=per_sample_weights is not None, BLOCK_D=block_d(max_dim))


def rows_grad_atomic(grad_out: torch.Tensor, rows: torch.Tensor, contrib_feature: torch.Tensor,
                     bag_of_value: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
                     meta: torch.Tensor, dest: torch.Tensor, max_dim: int) -> None:
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
        HAS_PSW=per_sample_weights is not None, BLOCK_D=block_d(max_dim))


def psw_grad(grad_out: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, contrib_feature: torch.Tensor,
             bag_of_value: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor, out: torch.Tensor,
             max_dim: int) -> None:
    """``out[c]`` = (row of contribution c) . (its bag's output gradient), MEAN-scaled; 0 if masked.

    Args as in :func:`rows_grad`; ``weights`` ``[W]``; ``out`` ``[M]`` fp32.
    """
    if statically_known_true(rows.numel() == 0):
        return
    grid = lambda cfg: (triton.cdiv(rows.numel(), cfg["BLOCK_Q"]),)  # noqa: E731
    wrap_triton(_psw_grad_kernel)[grid](
        grad_out, grad_out.stride(0), weights, rows, contrib_feature, bag_of_value, offsets, meta, out,
        rows.numel(), bag_of_value.numel(), grad_out.shape[0], max_dim, BLOCK_D=block_d(max_dim))
