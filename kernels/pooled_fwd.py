"""Forward of pooled embedding bags: every feature of every table in one launch.

Each program pools ``BLOCK_B`` bags of one feature, reading ids straight from the KJT's
key-major ``values``/``offsets``. The bags advance together, one id position at a time,
``UNROLL`` positions per step, so a step issues ``BLOCK_B * UNROLL`` independent row loads;
each row load is a contiguous, vectorised ``BLOCK_D``-wide read. Short bags (one id, as in
DLRM) therefore still keep many loads in flight, and the loop runs to the block's longest bag.
Each step's ids are loaded one step ahead (``_gather``), so that the loop waits for one DRAM
round trip per step; ``python benchmarks/tools/codegen_report.py`` reads that off the
machine code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import legacy_loops
from .common import META_FIELDS, block_d, feature_fields, single_config, wrap_triton
from .tuning import autotune


def _configs():
    if single_config():
        return [triton.Config({"BLOCK_B": 4, "UNROLL": 2}, num_warps=1)]
    return [
        triton.Config({"BLOCK_B": b, "UNROLL": u}, num_warps=w)
        for b, u, w in [(8, 4, 4), (16, 2, 4), (32, 1, 8), (64, 1, 8)]
    ]


@triton.jit
def _ids_at(values_ptr, starts, lengths, position, UNROLL: tl.constexpr):
    """The ids at positions ``position .. position+UNROLL-1`` of each bag: ``UNROLL`` ``[BLOCK_B]`` tensors
    (``sequence_fwd``'s loop; the pooled loop reads its ids with their weights, ``_ids_weights_at``)."""
    out = ()
    for u in tl.static_range(UNROLL):
        out = out + (tl.load(values_ptr + starts + (position + u), mask=(position + u) < lengths, other=0),)
    return out


@triton.jit
def _rows_at(ids, position, d0, cols, col_mask, starts, lengths, num_rows, dim, table_ptr, psw_ptr,
             HAS_PSW: tl.constexpr, UNROLL: tl.constexpr):
    """Columns ``cols`` of the rows of ``ids`` (at ``position``), ``UNROLL`` ``[BLOCK_B, BLOCK_D]``
    tensors in the table's dtype, their per-sample weights, and ``[BLOCK_B]`` counts of bad ids
    (``sequence_fwd``'s loop; the pooled loop uses ``_rows_weights_at``).
    A bad id's row is not loaded. Bad ids are checked and counted even when the caller will
    not read the counts: with the rows' mask depending on positions alone, ptxas gave later
    loads the registers of rows still in flight (seen with codegen_report)."""
    rows = ()
    psw = ()
    bad_ids = tl.zeros(starts.shape, dtype=tl.int32)
    for u in tl.static_range(UNROLL):
        row = ids[u].to(tl.int64)
        present = (position + u) < lengths
        bad = present & ((row < 0) | (row >= num_rows))
        present = present & ~bad
        bad_ids += (bad & (d0 == 0)).to(tl.int32)
        rows = rows + (tl.load(table_ptr + row[:, None] * dim + cols[None, :], mask=present[:, None] & col_mask[None, :],
                               other=0.0),)
        if HAS_PSW:
            psw = psw + (tl.load(psw_ptr + starts + (position + u), mask=present, other=0.0).to(tl.float32),)
        else:
            psw = psw + (1.0,)
    return rows, psw, bad_ids


@triton.jit
def _ids_weights_at(values_ptr, psw_ptr, starts, lengths, position, pw_base, pw_len, HAS_PSW: tl.constexpr,
            POSITIONAL: tl.constexpr, UNROLL: tl.constexpr):
    """The ids at positions ``position .. position+UNROLL-1`` of each bag: ``UNROLL`` ``[BLOCK_B]``
    tensors, and their weights (fp32, or 1.0 unweighted).

    The weights are loaded here, with the ids, a step before their rows: a weight depends on
    no id, and loaded beside its row it cost a second round trip per iteration where ptxas put
    it after the row (``fwd_b16_u2_w4_psw`` on triton 3.6 and 3.9, built as a real launch
    builds it). ``POSITIONAL``: ``psw_ptr`` holds position weights, and an id's weight is the
    scalar ``psw_ptr[pw_base + p]`` of its position ``p``, alike for every bag of the block; a
    position at or past ``pw_len`` weighs 1: ``pw_len < 0`` marks a feature without position
    weights, and bags longer than a feature's position weights are refused before the launch."""
    out = ()
    psw = ()
    for u in tl.static_range(UNROLL):
        present = (position + u) < lengths
        out = out + (tl.load(values_ptr + starts + (position + u), mask=present, other=0),)
        if POSITIONAL:
            psw = psw + (0.0,)  # loaded with the rows (_rows_weights_at)
        elif HAS_PSW:
            psw = psw + (tl.load(psw_ptr + starts + (position + u), mask=present, other=0.0).to(tl.float32),)
        else:
            psw = psw + (1.0,)
    return out, psw


@triton.jit
def _rows_weights_at(ids, psw, position, d0, cols, col_mask, starts, lengths, num_rows, dim, table_ptr, psw_ptr,
                     pw_base, pw_len, POSITIONAL: tl.constexpr, UNROLL: tl.constexpr):
    """Columns ``cols`` of the rows of ``ids`` (at ``position``), ``UNROLL`` ``[BLOCK_B, BLOCK_D]``
    tensors in the table's dtype, and ``[BLOCK_B]`` counts of bad ids.
    A bad id's row is not loaded (it adds 0, whatever its weight). Bad ids are checked and counted
    even when the caller will not read the counts: with the rows' mask depending on positions
    alone, ptxas gave later loads the registers of rows still in flight (seen with codegen_report)."""
    rows = ()
    weights = ()
    bad_ids = tl.zeros(starts.shape, dtype=tl.int32)
    for u in tl.static_range(UNROLL):
        if POSITIONAL:
            weights = weights + (tl.load(psw_ptr + pw_base + (position + u), mask=(position + u) < pw_len,
                                         other=1.0),)
        else:
            weights = weights + (psw[u],)
        row = ids[u].to(tl.int64)
        present = (position + u) < lengths
        bad = present & ((row < 0) | (row >= num_rows))
        present = present & ~bad
        bad_ids += (bad & (d0 == 0)).to(tl.int32)
        rows = rows + (tl.load(table_ptr + row[:, None] * dim + cols[None, :], mask=present[:, None] & col_mask[None, :],
                               other=0.0),)
    return rows, weights, bad_ids


@triton.jit
def _gather(acc, bad_ids, d0, cols, col_mask, starts, lengths, longest, num_rows, dim, table_ptr, values_ptr,
            psw_ptr, pw_base, pw_len, HAS_PSW: tl.constexpr, POSITIONAL: tl.constexpr, UNROLL: tl.constexpr):
    """Add columns ``cols`` of every bag's rows to ``acc`` ``[BLOCK_B, BLOCK_D]``, position by
    position, and count the bad ids per bag into ``bad_ids``.

    Pipelined two deep: an iteration adds the rows that the one before loaded, while it loads
    the next step's rows and the ids (and weights) of the step after. No load is waited for in
    the iteration that issues it, whatever registers ptxas gives it, so a step costs one DRAM
    round trip where loading each id just before its row cost two or more."""
    ids_ahead, psw_ahead = _ids_weights_at(values_ptr, psw_ptr, starts, lengths, 0, pw_base, pw_len, HAS_PSW,
                                           POSITIONAL, UNROLL)
    rows_next, psw_next, step_bad_ids = _rows_weights_at(ids_ahead, psw_ahead, 0, d0, cols, col_mask, starts, lengths,
                                                 num_rows, dim, table_ptr, psw_ptr, pw_base, pw_len, POSITIONAL,
                                                 UNROLL)
    bad_ids += step_bad_ids
    ids_ahead, psw_ahead = _ids_weights_at(values_ptr, psw_ptr, starts, lengths, UNROLL, pw_base, pw_len, HAS_PSW,
                                   POSITIONAL, UNROLL)
    for j in range(0, longest, UNROLL):
        rows_now = rows_next
        psw_now = psw_next
        if HAS_PSW or POSITIONAL:
            # weighted: add before this iteration's loads issue, so that no wait for the rows
            # and weights of before can fall on a scoreboard those loads share (2 round trips
            # per iteration otherwise, ptxas's choice, seen on fwd_b8_u4_w4 and b64_u1_w8)
            acc = _add_rows(acc, rows_now, psw_now, HAS_PSW, POSITIONAL, UNROLL)
        ids_next = ids_ahead
        psw_ids_next = psw_ahead
        ids_ahead, psw_ahead = _ids_weights_at(values_ptr, psw_ptr, starts, lengths, j + 2 * UNROLL, pw_base, pw_len,
                                       HAS_PSW, POSITIONAL, UNROLL)
        rows_next, psw_next, step_bad_ids = _rows_weights_at(ids_next, psw_ids_next, j + UNROLL, d0, cols, col_mask,
                                                             starts, lengths, num_rows, dim, table_ptr, psw_ptr,
                                                             pw_base, pw_len, POSITIONAL, UNROLL)
        bad_ids += step_bad_ids
        if not (HAS_PSW or POSITIONAL):
            acc = _add_rows(acc, rows_now, psw_now, HAS_PSW, POSITIONAL, UNROLL)
    return acc, bad_ids


@triton.jit
def _add_rows(acc, rows, psw, HAS_PSW: tl.constexpr, POSITIONAL: tl.constexpr, UNROLL: tl.constexpr):
    """``acc`` plus the ``UNROLL`` rows, each widened to fp32 and times its weight, in order."""
    for u in tl.static_range(UNROLL):
        if POSITIONAL:
            acc += rows[u].to(tl.float32) * psw[u].to(tl.float32)
        elif HAS_PSW:
            acc += rows[u].to(tl.float32) * psw[u][:, None]
        else:
            acc += rows[u].to(tl.float32)
    return acc


@autotune(configs=_configs(), key=["num_features", "BLOCK_D", "HAS_PSW", "POSITIONAL", "DIM_ALIGN", "HAS_INVERSE"])
@triton.jit
def _pooled_fwd_kernel(
    weights_ptr, values_ptr, offsets_ptr, psw_ptr, inverse_ptr, meta_ptr, out_ptr, bad_ids_ptr,
    batch_size, bag_stride, out_stride, num_features,
    HAS_PSW: tl.constexpr, HAS_INVERSE: tl.constexpr, BLOCK_D: tl.constexpr, DIM_ALIGN: tl.constexpr,
    LEGACY_LOOPS: tl.constexpr, BLOCK_B: tl.constexpr, UNROLL: tl.constexpr, POSITIONAL: tl.constexpr = False,
):
    # one program per BLOCK_B output rows (samples) of one feature; sample b pools bag b, or
    # (HAS_INVERSE, VBE) the bag its feature's inverse index names: no second pass expands
    # pooled bags to the batch
    f = tl.program_id(1)
    meta = meta_ptr + f * META_FIELDS
    # every dim, table offset and output column is a multiple of DIM_ALIGN: saying so lets
    # the compiler turn each row's column loads and stores into 16-byte vector accesses
    weight_offset, dim, num_rows, out_column, key, mean = feature_fields(meta, DIM_ALIGN, DIM_ALIGN)
    if POSITIONAL:
        # psw_ptr holds position weights; the features' [F, 2] (base, length) of them follow
        # the [F, META_FIELDS] metadata (one tensor, so the kernel takes no extra argument)
        position_meta = meta_ptr + num_features * META_FIELDS + 2 * f
        pw_base = tl.load(position_meta)
        pw_len = tl.load(position_meta + 1)
    else:
        pw_base = 0
        pw_len = 0

    samples = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bag_mask = samples < batch_size
    out_rows = tl.multiple_of(samples.to(tl.int64) * out_stride, DIM_ALIGN)  # out_stride: the sum of the dims
    if HAS_INVERSE:
        bags = tl.load(inverse_ptr + f * batch_size + samples, mask=bag_mask, other=0)
    else:
        bags = samples
    bag_ptrs = offsets_ptr + key * bag_stride + bags
    starts = tl.load(bag_ptrs, mask=bag_mask, other=0).to(tl.int64)
    lengths = tl.load(bag_ptrs + 1, mask=bag_mask, other=0).to(tl.int64) - starts
    longest = tl.max(lengths, axis=0)
    table_ptr = weights_ptr + weight_offset
    total_bad_ids = tl.zeros([], dtype=tl.int32)
    bad_ids = tl.zeros([BLOCK_B], dtype=tl.int32)  # per bag; summed once, after the loops

    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        if LEGACY_LOOPS:
            acc, total_bad_ids = legacy_loops.gather(acc, total_bad_ids, d0, cols, col_mask, starts, lengths, longest,
                                                     num_rows, dim, table_ptr, values_ptr, psw_ptr, HAS_PSW, UNROLL)
        else:
            acc, bad_ids = _gather(acc, bad_ids, d0, cols, col_mask, starts, lengths, longest, num_rows, dim,
                                   table_ptr, values_ptr, psw_ptr, pw_base, pw_len, HAS_PSW, POSITIONAL, UNROLL)
        if mean != 0:
            acc = acc / tl.maximum(lengths, 1).to(tl.float32)[:, None]
        tl.store(out_ptr + out_rows[:, None] + out_column + cols[None, :], acc,
                 mask=bag_mask[:, None] & col_mask[None, :])
    total_bad_ids += tl.sum(bad_ids, axis=0)
    if total_bad_ids > 0:
        tl.atomic_add(bad_ids_ptr + f, total_bad_ids.to(tl.int64))


def pooled_fwd(weights: torch.Tensor, batch, meta: torch.Tensor, out: torch.Tensor, bad_ids: torch.Tensor,
               max_dim: int, alignment: int, bag_stride: int, position_weights: torch.Tensor = None,
               position_meta: torch.Tensor = None) -> None:
    """Pool every feature into ``out``, in one launch.

    Args:
        weights: ``[W]`` flat weights of every table, fp32/fp16/bf16.
        batch: the op layer's ``OpBatch``: ``values`` ``[N]`` int32/int64 ids, key-major;
            ``offsets`` ``[K*B'+1]`` int32/int64 bag starts, key-major, ``bag_stride`` (B') bags
            per key; ``per_sample_weights`` ``[N]`` float, or None; ``inverse_indices`` ``[F, B]``
            int64, the bag (in ``[0, B')``) each sample of each feature pools (VBE), or None:
            sample ``b`` pools bag ``b`` (``B == B'``).
        meta: ``[F, META_FIELDS]`` int64 per feature (see ``common``).
        out: ``[B, total_dim]`` fp32, written in full.
        bad_ids: ``[F]`` int64, incremented by the number of ids outside ``[0, rows)``; those ids
            are always skipped (the check costs two compares per id, and its count is read
            only when the caller asks for it).
        max_dim: the widest feature dim.
        alignment: a power of two dividing every dim, table offset and output column.
        position_weights: ``[P]`` float, every feature's position weights concatenated, or None;
            given, they weigh each id by its position in its bag (``batch.per_sample_weights``
            must be None): no per-id weight tensor is made.
        position_meta: ``[F, 2]`` int64 with ``position_weights``: feature ``f``'s weights are
            ``position_weights[base:base + length]`` (``length < 0``: every id weighs 1).
    """
    num_features = meta.shape[0]
    batch_size = out.shape[0]
    if num_features == 0 or batch_size == 0:
        return
    assert meta.shape[1] == META_FIELDS
    per_sample_weights, inverse_indices = batch.per_sample_weights, batch.inverse_indices
    positional = position_weights is not None
    assert not (positional and (per_sample_weights is not None or legacy_loops.enabled()))
    if positional:
        assert position_meta is not None and position_meta.shape == (num_features, 2)
        per_sample_weights = position_weights
        meta = torch.cat([meta.reshape(-1), position_meta.reshape(-1).to(meta)])
    grid = lambda cfg: (triton.cdiv(batch_size, cfg["BLOCK_B"]), num_features)  # noqa: E731
    wrap_triton(_pooled_fwd_kernel)[grid](
        weights, batch.values, batch.offsets, per_sample_weights if per_sample_weights is not None else out,
        inverse_indices.contiguous() if inverse_indices is not None else batch.offsets, meta, out, bad_ids,
        batch_size, bag_stride, out.stride(0), num_features,
        HAS_PSW=per_sample_weights is not None and not positional, HAS_INVERSE=inverse_indices is not None,
        BLOCK_D=block_d(max_dim), DIM_ALIGN=alignment, LEGACY_LOOPS=legacy_loops.enabled(), POSITIONAL=positional)
