"""Sequence (unpooled) embeddings: every id's row, for every feature of every table, in one launch.

The output is flat, feature after feature: feature ``f`` (key ``k``) holds ``[N_k, dim_f]``
rows at element ``out_start_f``, the sum over the features before it of ``N_key * dim``.
Each program takes ``BLOCK_B`` bags of one feature and works out ``out_start_f`` itself from
the offsets (one vector load per feature), so no pass before the launch is needed. The bags
advance together one id position at a time, ``UNROLL`` positions per step, each id's row
copied to its place; ids are loaded one step ahead, as in ``pooled_fwd``. Ids outside their
table are not read: their rows come out zero, and they are counted per feature.

``_rows_grad_atomic_kernel`` is the backward with atomics (``deterministic=False``): each
contribution adds its output-gradient row to its table row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .common import META_DIM, META_FIELDS, META_KEY, META_ROWS, META_WEIGHT_OFFSET, block_d, single_config, wrap_triton
from .pooled_fwd import _ids_at, _rows_at
from .tuning import autotune


def _configs():
    if single_config():
        return [triton.Config({"BLOCK_B": 4, "UNROLL": 2}, num_warps=1)]
    return [triton.Config({"BLOCK_B": b, "UNROLL": u}, num_warps=w) for b, u, w in [(16, 2, 4), (32, 1, 8), (64, 1, 8)]]


@triton.jit
def out_start(meta_ptr, offsets_ptr, f, batch_size, BLOCK_F: tl.constexpr):
    """Element of the flat output where feature ``f``'s rows start: the sum, over the features
    before it, of their keys' id counts times their dims."""
    before = tl.arange(0, BLOCK_F)
    live = before < f
    key = tl.load(meta_ptr + before * META_FIELDS + META_KEY, mask=live, other=0)
    dim = tl.load(meta_ptr + before * META_FIELDS + META_DIM, mask=live, other=0)
    count = (tl.load(offsets_ptr + (key + 1) * batch_size, mask=live, other=0).to(tl.int64)
             - tl.load(offsets_ptr + key * batch_size, mask=live, other=0).to(tl.int64))
    return tl.sum(count * dim, axis=0)


@autotune(configs=_configs(), key=["num_features", "BLOCK_D", "DIM_ALIGN"])
@triton.jit
def _sequence_fwd_kernel(
    weights_ptr, values_ptr, offsets_ptr, meta_ptr, out_ptr, bad_ids_ptr, batch_size, num_features,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DIM_ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    UNROLL: tl.constexpr,
):
    f = tl.program_id(1)
    meta = meta_ptr + f * META_FIELDS
    weight_offset = tl.multiple_of(tl.load(meta + META_WEIGHT_OFFSET), DIM_ALIGN)
    dim = tl.multiple_of(tl.load(meta + META_DIM), DIM_ALIGN)
    num_rows = tl.load(meta + META_ROWS)
    key = tl.load(meta + META_KEY)
    key_start = tl.load(offsets_ptr + key * batch_size).to(tl.int64)
    # a sum of multiples of the dims, hence of DIM_ALIGN
    base = tl.multiple_of(out_start(meta_ptr, offsets_ptr, f, batch_size, BLOCK_F), DIM_ALIGN)

    bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bag_mask = bags < batch_size
    bag_ptrs = offsets_ptr + key * batch_size + bags
    starts = tl.load(bag_ptrs, mask=bag_mask, other=0).to(tl.int64)
    lengths = tl.load(bag_ptrs + 1, mask=bag_mask, other=0).to(tl.int64) - starts
    longest = tl.max(lengths, axis=0)
    table_ptr = weights_ptr + weight_offset
    # where each bag's first row goes; every dim (hence row) is a multiple of DIM_ALIGN
    out_rows = base + (starts - key_start) * dim
    bad_ids = tl.zeros([BLOCK_B], dtype=tl.int32)

    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        ahead = _ids_at(values_ptr, starts, lengths, 0, UNROLL)
        for j in range(0, longest, UNROLL):
            ids_now = ahead
            ahead = _ids_at(values_ptr, starts, lengths, j + UNROLL, UNROLL)
            rows, _, step_bad_ids = _rows_at(ids_now, j, d0, cols, col_mask, starts, lengths, num_rows, dim,
                                             table_ptr, values_ptr, False, UNROLL)
            bad_ids += step_bad_ids
            for u in tl.static_range(UNROLL):
                present = (j + u) < lengths
                # the promise on the row pointers themselves: made on loop-carried offsets, it is lost
                row_ptrs = tl.multiple_of(out_ptr + out_rows + (j + u) * dim, DIM_ALIGN)
                tl.store(row_ptrs[:, None] + cols[None, :], rows[u], mask=present[:, None] & col_mask[None, :])
    total_bad_ids = tl.sum(bad_ids, axis=0)
    if total_bad_ids > 0:
        tl.atomic_add(bad_ids_ptr + f, total_bad_ids.to(tl.int64))


def sequence_fwd(weights: torch.Tensor, batch, meta: torch.Tensor, out: torch.Tensor, bad_ids: torch.Tensor,
                 batch_size: int, max_dim: int, alignment: int) -> None:
    """Copy every id's row into ``out``, in one launch.

    Args:
        weights: ``[W]`` flat weights of every table, fp32/fp16/bf16.
        batch: the op layer's ``OpBatch``: ``values`` ``[N]`` int32/int64 ids, key-major;
            ``offsets`` ``[K*B+1]`` int32/int64 bag starts, key-major (``batch_size`` = B).
        meta: ``[F, META_FIELDS]`` int64 per feature (see ``common``).
        out: flat, in the weights' dtype, ``sum_f N_{key(f)} * dim_f`` elements, written in full.
        bad_ids: ``[F]`` int64, incremented by the number of ids outside ``[0, rows)`` (skipped).
        alignment: a power of two dividing every dim and table offset.
    """
    num_features = meta.shape[0]
    if num_features == 0 or batch_size == 0:
        return
    grid = lambda cfg: (triton.cdiv(batch_size, cfg["BLOCK_B"]), num_features)  # noqa: E731
    wrap_triton(_sequence_fwd_kernel)[grid](
        weights, batch.values, batch.offsets, meta, out, bad_ids, batch_size, num_features,
        BLOCK_F=max(16, triton.next_power_of_2(num_features)), BLOCK_D=block_d(max_dim), DIM_ALIGN=alignment)


def _atomic_configs():
    if single_config():
        return [triton.Config({"BLOCK_Q": 8}, num_warps=1)]
    return [triton.Config({"BLOCK_Q": q}, num_warps=w) for q, w in [(32, 4), (64, 8)]]


@autotune(configs=_atomic_configs(), key=["BLOCK_D", "DIM_ALIGN"])
@triton.jit
def _rows_grad_atomic_kernel(grad_out_ptr, rows_ptr, item_offset_ptr, contrib_feature_ptr, meta_ptr, dest_ptr,
                             num_contributions, BLOCK_D: tl.constexpr, DIM_ALIGN: tl.constexpr,
                             BLOCK_Q: tl.constexpr):
    c = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row = tl.load(rows_ptr + c, mask=c < num_contributions, other=-1)
    live = row >= 0
    f = tl.load(contrib_feature_ptr + c, mask=live, other=0).to(tl.int64)
    # every row, dim and output row is a multiple of DIM_ALIGN (dead lanes: 0)
    dim = tl.multiple_of(tl.load(meta_ptr + f * META_FIELDS + META_DIM, mask=live, other=0), DIM_ALIGN)
    source = tl.multiple_of(tl.load(item_offset_ptr + c, mask=live, other=0), DIM_ALIGN)
    row = tl.multiple_of(tl.where(live, row, 0), DIM_ALIGN)
    for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < dim[:, None])
        g = tl.load(grad_out_ptr + source[:, None] + cols[None, :], mask=mask, other=0.0)
        # relaxed: sums need no ordering with other memory, and acq_rel would fence every add
        tl.atomic_add(dest_ptr + row[:, None] + cols[None, :], g, mask=mask, sem="relaxed")

def rows_grad_atomic(grad_out: torch.Tensor, parts, item_offset: torch.Tensor, meta: torch.Tensor,
                     dest: torch.Tensor, max_dim: int, alignment: int) -> None:
    """Add each contribution's gradient row (``[M]`` element offsets ``item_offset`` into the
    fp32 ``grad_out``) to its table row of the fp32 ``[W]`` ``dest``; ``parts``: the
    contributions (``pooled_bwd.Contributions``: their ``rows``, -1 masked, and ``feature``)."""
    num = parts.rows.shape[0]
    if statically_known_true(num == 0):
        return
    grid = lambda cfg: (triton.cdiv(num, cfg["BLOCK_Q"]),)  # noqa: E731
    wrap_triton(_rows_grad_atomic_kernel)[grid](grad_out, parts.rows, item_offset, parts.feature, meta, dest, num,
                                                BLOCK_D=block_d(max_dim), DIM_ALIGN=alignment)
