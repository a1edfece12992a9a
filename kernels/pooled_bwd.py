"""Backward kernels that take the contributions in any order.

The op lists every (feature, id) pair as a *contribution* ``c`` in ``[0, P*N)``: id
``c % N`` as read by the feature of pass ``c // N`` (a pass holds each KJT key at most once;
a key read by two tables needs two passes). For each contribution it precomputes, with
plain torch ops and no host sync:

* ``feature[c]``: the feature, or -1 when the id is not read in that pass or is outside its
  table (such ids were skipped in the forward, so they get no gradient);
* ``rows[c]``: element offset of the id's row in the flat weights (-1 when masked);

and, per id, ``bag_of_value``: its key-major bag. The three make :class:`Contributions`.

* ``_rows_grad_atomic_kernel`` (``deterministic=False``): ``atomic_add`` into rows, fast,
  with run-to-run rounding differences.
* ``_psw_grad_kernel``: per contribution, the dot of its row with its bag's output gradient.
* ``_position_grad_kernel``: per position weight, the sum of those dots over the ids that
  read it (position ``p`` of every bag of its key), straight from the ids and offsets.

The deterministic weight gradient and the fused optimizers sort the contributions by row
first: see ``row_runs``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
import triton.language as tl

from .common import (META_DIM, META_FIELDS, META_KEY, META_MEAN, META_OUT_COLUMN, block_d, feature_fields, single_config,
                     wrap_triton)
from .tuning import autotune


class Contributions(NamedTuple):
    """Every (pass, id) pair of a batch, ``M = P*N`` of them (made by the op layer's
    ``runs_triton.contributions``)."""

    feature: torch.Tensor       # [M] int32 feature of each contribution, -1 masked (not read, or a bad id)
    rows: torch.Tensor          # [M] int64 element offset of its row in the flat weights, -1 masked
    bag_of_value: torch.Tensor  # [N] int64 key-major bag (k*B + b) of each id


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
    dim = tl.load(meta + META_DIM, mask=mask, other=0)
    out_column = tl.load(meta + META_OUT_COLUMN, mask=mask, other=0)
    key = tl.load(meta + META_KEY, mask=mask, other=0)
    mean = tl.load(meta + META_MEAN, mask=mask, other=0)
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


@autotune(configs=_q_configs([(16, 2), (32, 4), (64, 8)]), key=["BLOCK_D", "HAS_PSW", "DIM_ALIGN"])
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


@autotune(configs=_q_configs([(16, 2), (32, 4), (64, 8)]), key=["BLOCK_D", "DIM_ALIGN"])
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


def _b_configs():
    if single_config():
        return [triton.Config({"BLOCK_B": 4}, num_warps=1)]
    return [triton.Config({"BLOCK_B": b}, num_warps=w) for b, w in [(16, 2), (32, 4), (64, 8)]]


@autotune(configs=_b_configs(), key=["BLOCK_D", "DIM_ALIGN"])
@triton.jit
def _position_grad_kernel(
    grad_out_ptr, grad_stride, weights_ptr, values_ptr, offsets_ptr, meta_ptr, position_meta_ptr, out_ptr,
    num_features, batch_size,
    DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # one program per position weight j: every feature whose key reads j at position p adds, over
    # its bags, dot(its row of the bag's id at p, the bag's output gradient), MEAN-scaled. Each
    # sum is in one program in a fixed order (bags in blocks, tl.sum per block, features in
    # order): deterministic, no atomics, and no [N] per-id gradient
    j = tl.program_id(0)
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for f in range(num_features):
        base = tl.load(position_meta_ptr + 2 * f)
        length = tl.load(position_meta_ptr + 2 * f + 1)
        p = j - base
        if (p >= 0) & (p < length):
            weight_offset, dim, num_rows, out_column, key, mean = feature_fields(
                meta_ptr + f * META_FIELDS, DIM_ALIGN, DIM_ALIGN)
            for b0 in range(0, batch_size, BLOCK_B):
                bags = b0 + tl.arange(0, BLOCK_B)
                in_batch = bags < batch_size
                bag = key * batch_size + bags
                start = tl.load(offsets_ptr + bag, mask=in_batch, other=0).to(tl.int64)
                bag_length = tl.load(offsets_ptr + bag + 1, mask=in_batch, other=0).to(tl.int64) - start
                present = in_batch & (p < bag_length)
                row = tl.load(values_ptr + start + p, mask=present, other=0).to(tl.int64)
                live = present & (row >= 0) & (row < num_rows)  # bad ids were skipped in the forward
                # every lane's offsets are multiples of DIM_ALIGN (dead lanes' loads are masked off)
                row = tl.multiple_of(weight_offset + row * dim, DIM_ALIGN)
                grad_row = tl.multiple_of(bags.to(tl.int64) * grad_stride + out_column, DIM_ALIGN)
                dot = tl.zeros([BLOCK_B], dtype=tl.float32)
                for d0 in range(0, dim, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    mask = live[:, None] & (cols[None, :] < dim)
                    grads = tl.load(grad_out_ptr + grad_row[:, None] + cols[None, :], mask=mask, other=0.0)
                    rows = tl.load(weights_ptr + row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    dot += tl.sum(grads * rows, axis=1)
                scale = tl.where(mean != 0, 1.0 / tl.maximum(bag_length, 1).to(tl.float32), 1.0)
                total += dot * scale  # dead lanes loaded zeros: their dot is 0
    tl.store(out_ptr + j, tl.sum(total, axis=0))


def position_grad(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  meta: torch.Tensor, position_meta: torch.Tensor, out: torch.Tensor, max_dim: int,
                  alignment: int) -> None:
    """``out[j]`` (``[P]`` fp32) = the position weights' gradient: over every feature whose key
    reads weight ``j`` (at position ``p = j - base``) and every bag of that key with an id at
    ``p``, dot(the id's row, the bag's output gradient), divided by the bag's length for MEAN.
    Weights no feature reads get 0.

    Args:
        grad_out: ``[B', total_dim]`` fp32 contiguous, one row per bag slot of a key.
        values, offsets: ``[N]`` ids and ``[K*B'+1]`` key-major bag starts.
        meta: ``[F, META_FIELDS]`` int64; position_meta: ``[F, 2]`` int64 each feature's key's
            ``base, length`` of position weights (``length < 0``: none).
        max_dim, alignment: as in :func:`rows_grad_atomic`.
    """
    if statically_known_true(out.numel() == 0):
        return
    wrap_triton(_position_grad_kernel)[(out.numel(),)](
        grad_out, grad_out.stride(0), weights, values, offsets, meta, position_meta, out, meta.shape[0],
        grad_out.shape[0], DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim))


def rows_grad_atomic(grad_out: torch.Tensor, parts: Contributions, batch, meta: torch.Tensor, dest: torch.Tensor,
                     max_dim: int, alignment: int) -> None:
    """Row gradients by ``atomic_add`` into ``dest`` (``[W]`` fp32, zeroed): fast, order not fixed.

    Args:
        grad_out: ``[B, total_dim]`` fp32 contiguous output gradient.
        parts: the contributions, in any order.
        batch: the op layer's ``OpBatch`` (its ``offsets`` and ``per_sample_weights``).
        meta: ``[F, META_FIELDS]`` int64 feature metadata.
        max_dim, alignment: the widest dim; a power of two dividing every dim, table offset
            and output column.
    """
    rows = parts.rows
    if statically_known_true(rows.numel() == 0):
        return
    per_sample_weights = batch.per_sample_weights
    grid = lambda cfg: (triton.cdiv(rows.numel(), cfg["BLOCK_Q"]),)  # noqa: E731
    wrap_triton(_rows_grad_atomic_kernel)[grid](
        grad_out, grad_out.stride(0), rows, parts.feature, parts.bag_of_value, batch.offsets,
        per_sample_weights if per_sample_weights is not None else grad_out, meta, dest,
        rows.numel(), parts.bag_of_value.numel(), grad_out.shape[0], max_dim,
        HAS_PSW=per_sample_weights is not None, DIM_ALIGN=alignment, BLOCK_D=block_d(max_dim))


def psw_grad(grad_out: torch.Tensor, weights: torch.Tensor, parts: Contributions, batch, meta: torch.Tensor,
             out: torch.Tensor, max_dim: int, alignment: int) -> None:
    """``out[c]`` = (row of contribution c) . (its bag's output gradient), MEAN-scaled; 0 if masked.

    Args as in :func:`rows_grad_atomic`; ``weights`` ``[W]``; ``out`` ``[M]`` fp32.
    """
    rows = parts.rows
    if statically_known_true(rows.numel() == 0):
        return
    grid = lambda cfg: (triton.cdiv(rows.numel(), cfg["BLOCK_Q"]),)  # noqa: E731
    wrap_triton(_psw_grad_kernel)[grid](
        grad_out, grad_out.stride(0), weights, rows, parts.feature, parts.bag_of_value, batch.offsets, meta, out,
        rows.numel(), parts.bag_of_value.numel(), grad_out.shape[0], max_dim, DIM_ALIGN=alignment,
        BLOCK_D=block_d(max_dim))
