"""Forward of quantized embedding bags: every feature of every table, INT8, INT4 and FP16, in one launch.

The pooled forward's loop (``pooled_fwd``) over quantized rows: each program pools
``BLOCK_B`` bags of one feature, whose table's storage type (``QMETA_STORAGE``) picks how a
row is read. A row's codes are loaded as bytes from its start (16-byte aligned where the
layout is, ``ROW_ALIGN``), its scale and bias from its last bytes, and it is dequantized in
registers (``code * scale + bias``) before it is added, in fp32. Ids outside their table are
skipped and counted, as in the float kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_d, feature_fields, single_config, wrap_triton
from .tuning import autotune

# The per-feature metadata, [F, QMETA_FIELDS] int64: the float kernels' first six fields
# (common.META_*: META_WEIGHT_OFFSET is here the table's first byte in its storage type's
# buffer), then these three.
QMETA_STORAGE: tl.constexpr = tl.constexpr(6)    # storage type: 1 INT8, 2 INT4, 3 FP16
QMETA_ROW_BYTES: tl.constexpr = tl.constexpr(7)  # row stride in bytes
QMETA_FEATURE: tl.constexpr = tl.constexpr(8)    # the feature's index (its bad-id count), for quant_fwd_short
QMETA_FIELDS: tl.constexpr = tl.constexpr(9)


def _configs():
    if single_config():
        return [triton.Config({"BLOCK_B": 4}, num_warps=1)]
    # INT4 rows are half a byte a column: a tile of BLOCK_B rows' BLOCK_D // 2 packed bytes gives
    # each thread a 16-byte load only from BLOCK_B * BLOCK_D / 2 >= 16 * 32 * num_warps on (and
    # dims that are multiples of 32): 32 bags at 4 warps for dim 128. Tried and dropped: 64 at 8
    # warps (the INT4 loop took 2 round trips with per-id weights on triton 3.6), 64 at 4 and 32
    # at 2 (spilled with per-id weights), 16 at 4 (INT4 in 8-byte loads).
    return [triton.Config({"BLOCK_B": 32}, num_warps=4)]


@triton.jit
def _fetch(table_ptr, ids, position, starts, lengths, num_rows, d0, cols, col_mask, dim, row_bytes, psw_ptr,
           HAS_PSW: tl.constexpr, STORAGE: tl.constexpr, ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr,
           BLOCK_D: tl.constexpr, WORDS: tl.constexpr = False, PER_BAG: tl.constexpr = False):
    """Issue the loads of the rows ``ids`` (at ``position`` of each bag) and return them as
    stored, for :func:`_dequantize` an iteration later: a tuple of the codes (INT8: ``[BLOCK_B,
    BLOCK_D]`` bytes; INT4: ``[BLOCK_B, BLOCK_D // 2]`` packed bytes; FP16: ``[BLOCK_B,
    BLOCK_D]`` values) and, but for FP16, the rows' scales and biases; then which rows are
    present (in their bag, id in range), their per-id weights, and ``[BLOCK_B]`` bad-id counts.
    ``col_mask`` is the tile's column mask, ``[1, BLOCK_D]``, or ``[BLOCK_B, BLOCK_D]`` where
    ``PER_BAG``: ``dim`` is then a ``[BLOCK_B, 1]`` column, a dim per bag (quant_fwd_short's).

    ``WORDS``: the codes or values as ``[BLOCK_B, BLOCK_D * bytes / 4]`` int32 words instead
    (rows are 4-byte aligned, ROW_ALIGN >= 4), split by :func:`_dequantize`. Bytes and halves
    each take a register of their own, and ptxas unpacked them from the loaded vectors in the
    iteration that loads them, which waits for the rows there (triton 3.6); words are carried
    to the next iteration as loaded. A word past a row's last value reads bytes inside the row
    (its padding, scale or bias), which the column mask then zeroes."""
    ids = ids.to(tl.int64)
    present = position < lengths
    bad = present & ((ids < 0) | (ids >= num_rows))
    present = present & ~bad
    rows = tl.multiple_of(table_ptr + ids * row_bytes, ROW_ALIGN)  # each row's first byte
    mask = present[:, None] & col_mask
    if WORDS:
        # values per word: 4 INT8 codes, 8 INT4 codes, 2 FP16 values
        PER_WORD: tl.constexpr = 4 if STORAGE == 1 else (8 if STORAGE == 2 else 2)
        words = d0 // PER_WORD + tl.arange(0, BLOCK_D // PER_WORD)
        if DIM_ALIGN >= PER_WORD:  # the mask's bound keeps the words' alignment, and the loads their width
            num_words = tl.multiple_of(dim // PER_WORD, [DIM_ALIGN // PER_WORD] * (2 if PER_BAG else 1))
        else:
            num_words = (dim + PER_WORD - 1) // PER_WORD
        codes = tl.load(rows.to(tl.pointer_type(tl.int32))[:, None] + words[None, :],
                        mask=present[:, None] & (words[None, :] < num_words), other=0)
        if STORAGE == 3:
            raw = (codes,)
        elif STORAGE == 1:
            scale_bias = (rows + row_bytes - 8).to(tl.pointer_type(tl.float32))
            raw = (codes, tl.load(scale_bias, mask=present, other=0.0), tl.load(scale_bias + 1, mask=present, other=0.0))
        else:
            scale_bias = (rows + row_bytes - 4).to(tl.pointer_type(tl.float16))
            raw = (codes, tl.load(scale_bias, mask=present, other=0.0), tl.load(scale_bias + 1, mask=present, other=0.0))
    elif STORAGE == 3:  # FP16 values
        raw = (tl.load(rows.to(tl.pointer_type(tl.float16))[:, None] + cols[None, :], mask=mask, other=0.0),)
    elif STORAGE == 1:  # INT8 codes, fp32 scale and bias
        scale_bias = (rows + row_bytes - 8).to(tl.pointer_type(tl.float32))
        raw = (tl.load(rows[:, None] + cols[None, :], mask=mask, other=0), tl.load(scale_bias, mask=present, other=0.0),
               tl.load(scale_bias + 1, mask=present, other=0.0))
    else:  # INT4 codes, two per byte (low nibble first), fp16 scale and bias
        # the tile's BLOCK_D/2 bytes, loaded once each (contiguous, so in vectors), split later
        pairs = d0 // 2 + tl.arange(0, BLOCK_D // 2)
        if DIM_ALIGN >= 2:  # even dims: the mask's bound keeps their alignment, and the loads their width
            num_bytes = tl.multiple_of(dim // 2, [DIM_ALIGN // 2] * (2 if PER_BAG else 1))
        else:
            num_bytes = (dim + 1) // 2
        scale_bias = (rows + row_bytes - 4).to(tl.pointer_type(tl.float16))
        raw = (tl.load(rows[:, None] + pairs[None, :], mask=present[:, None] & (pairs[None, :] < num_bytes), other=0),
               tl.load(scale_bias, mask=present, other=0.0), tl.load(scale_bias + 1, mask=present, other=0.0))
    if HAS_PSW:
        psw = tl.load(psw_ptr + starts + position, mask=present, other=0.0).to(tl.float32)
    else:
        psw = tl.zeros(starts.shape, dtype=tl.float32)
    return raw, present, psw, (bad & (d0 == 0)).to(tl.int32)


@triton.jit
def _field(words, i: tl.constexpr, BITS: tl.constexpr):
    return (words >> (BITS * i)) & ((1 << BITS) - 1)


@triton.jit
def _split(words, BITS: tl.constexpr, COUNT: tl.constexpr):
    """``[R, W]`` int32 words -> ``[R, W * COUNT]`` int32 fields of ``BITS`` bits each, in memory
    order (little-endian: the low field first). Interleaving two tensors alternates their
    elements, so the fields are paired by bit-reversed index: (0, 4), (2, 6), then those pairs."""
    if COUNT == 2:
        out = tl.interleave(_field(words, 0, BITS), _field(words, 1, BITS))
    elif COUNT == 4:
        out = tl.interleave(tl.interleave(_field(words, 0, BITS), _field(words, 2, BITS)),
                            tl.interleave(_field(words, 1, BITS), _field(words, 3, BITS)))
    else:
        even = tl.interleave(tl.interleave(_field(words, 0, BITS), _field(words, 4, BITS)),
                             tl.interleave(_field(words, 2, BITS), _field(words, 6, BITS)))
        odd = tl.interleave(tl.interleave(_field(words, 1, BITS), _field(words, 5, BITS)),
                            tl.interleave(_field(words, 3, BITS), _field(words, 7, BITS)))
        out = tl.interleave(even, odd)
    return out


@triton.jit
def _dequantize(raw, present, col_mask, STORAGE: tl.constexpr, WORDS: tl.constexpr = False):
    """``[BLOCK_B, BLOCK_D]`` fp32 rows from :func:`_fetch`'s tuple (0 where not ``present``);
    ``col_mask`` as :func:`_fetch`'s."""
    if WORDS:
        if STORAGE == 3:
            halves = _split(raw[0], 16, 2).to(tl.int16).to(tl.float16, bitcast=True)
            rows = tl.where(col_mask, halves.to(tl.float32), 0.0)
        else:
            codes = _split(raw[0], 8 if STORAGE == 1 else 4, 4 if STORAGE == 1 else 8).to(tl.float32)
            rows = tl.where(present[:, None] & col_mask,
                            codes * raw[1].to(tl.float32)[:, None] + raw[2].to(tl.float32)[:, None], 0.0)
    elif STORAGE == 3:
        rows = raw[0].to(tl.float32)
    else:
        if STORAGE == 1:
            codes = raw[0].to(tl.float32)
        else:
            packed = raw[0].to(tl.int32)
            codes = tl.interleave(packed & 15, packed >> 4).to(tl.float32)
        rows = tl.where(present[:, None] & col_mask,
                        codes * raw[1].to(tl.float32)[:, None] + raw[2].to(tl.float32)[:, None], 0.0)
    return rows


@triton.jit
def _pool(acc, bad_ids, d0, cols, col_mask, dim, starts, lengths, longest, num_rows, row_bytes, table_ptr, values_ptr,
          psw_ptr, HAS_PSW: tl.constexpr, STORAGE: tl.constexpr, ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr,
          BLOCK_D: tl.constexpr, WORDS: tl.constexpr = False):
    """Add columns ``cols`` of every bag's dequantized rows to ``acc``, one id position at a time.

    Pipelined two deep, as the pooled forward's loop: an iteration adds the rows that the one
    before loaded, while it loads the next position's rows and the ids of the position after.
    No load is waited for in the iteration that issues it, so a position costs one DRAM round
    trip; loading each id just before its row cost two, since ptxas issued the next id load
    only after the row came back, in the row's registers (seen with codegen_report)."""
    col_mask = col_mask[None, :]  # _fetch and _dequantize take a tile's mask: [1, BLOCK_D] here
    ids = tl.load(values_ptr + starts, mask=lengths > 0, other=0)
    raw_next, present_next, psw_next, bad = _fetch(table_ptr, ids, 0, starts, lengths, num_rows, d0, cols, col_mask,
                                                   dim, row_bytes, psw_ptr, HAS_PSW, STORAGE, ROW_ALIGN, DIM_ALIGN,
                                                   BLOCK_D, WORDS)
    bad_ids += bad
    ahead = tl.load(values_ptr + starts + 1, mask=1 < lengths, other=0)
    for j in range(0, longest):
        raw_now = raw_next
        present_now = present_next
        psw_now = psw_next
        ids = ahead
        ahead = tl.load(values_ptr + starts + j + 2, mask=(j + 2) < lengths, other=0)
        raw_next, present_next, psw_next, bad = _fetch(table_ptr, ids, j + 1, starts, lengths, num_rows, d0, cols,
                                                       col_mask, dim, row_bytes, psw_ptr, HAS_PSW, STORAGE, ROW_ALIGN,
                                                       DIM_ALIGN, BLOCK_D, WORDS)
        bad_ids += bad
        rows = _dequantize(raw_now, present_now, col_mask, STORAGE, WORDS)
        if HAS_PSW:
            rows = rows * psw_now[:, None]
        acc += rows
    return acc, bad_ids


@autotune(configs=_configs(), key=["num_features", "BLOCK_D", "HAS_PSW", "ROW_ALIGN", "DIM_ALIGN", "SHORT"])
@triton.jit
def _quant_fwd_kernel(
    int8_ptr, int4_ptr, fp16_ptr, values_ptr, offsets_ptr, psw_ptr, meta_ptr, out_ptr, bad_ids_ptr,
    batch_size, out_stride, num_features,
    HAS_PSW: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr,
    SHORT: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # SHORT > 0: the pass for the bags longer than SHORT ids, which quant_fwd_short's kernel left
    # (the others are neither read nor written; where a program has none it stops after its offsets)
    # One kernel holds the three storage types' loops, and ptxas gives it the registers of the
    # hungriest plus ~50 (208 at 32 bags of dim 128, against 141 for the INT8 loop alone). A build
    # for one storage type was tried: triton 3.6 then moved the INT8 codes' byte extraction into
    # the iteration that loads them, which waits for the row there (2 round trips); so not yet.
    f = tl.program_id(1)
    meta = meta_ptr + f * QMETA_FIELDS
    # the layout's alignments, promised to the compiler so that rows move in vectors: every row
    # stride and table offset a multiple of ROW_ALIGN bytes, every dim and output column of DIM_ALIGN
    first_byte, dim, num_rows, out_column, key, mean = feature_fields(meta, ROW_ALIGN, DIM_ALIGN)
    storage = tl.load(meta + QMETA_STORAGE)
    row_bytes = tl.multiple_of(tl.load(meta + QMETA_ROW_BYTES), ROW_ALIGN)

    bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bag_mask = bags < batch_size
    bag_ptrs = offsets_ptr + key * batch_size + bags
    starts = tl.load(bag_ptrs, mask=bag_mask, other=0).to(tl.int64)
    lengths = tl.load(bag_ptrs + 1, mask=bag_mask, other=0).to(tl.int64) - starts
    if SHORT > 0:
        bag_mask = bag_mask & (lengths > SHORT)
        lengths = tl.where(bag_mask, lengths, 0)
    longest = tl.max(lengths, axis=0)
    bad_ids = tl.zeros([BLOCK_B], dtype=tl.int32)
    if SHORT > 0:
        dim = tl.where(longest > 0, dim, 0)  # no long bag here: no tile to pool or store
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        # the storage type is the same for the whole program: one branch, outside the loop
        if storage == 1:
            acc, bad_ids = _pool(acc, bad_ids, d0, cols, col_mask, dim, starts, lengths, longest, num_rows, row_bytes,
                                 int8_ptr + first_byte, values_ptr, psw_ptr, HAS_PSW, 1, ROW_ALIGN, DIM_ALIGN, BLOCK_D)
        elif storage == 2:
            acc, bad_ids = _pool(acc, bad_ids, d0, cols, col_mask, dim, starts, lengths, longest, num_rows, row_bytes,
                                 int4_ptr + first_byte, values_ptr, psw_ptr, HAS_PSW, 2, ROW_ALIGN, DIM_ALIGN, BLOCK_D,
                                 ROW_ALIGN >= 4)
        else:
            acc, bad_ids = _pool(acc, bad_ids, d0, cols, col_mask, dim, starts, lengths, longest, num_rows, row_bytes,
                                 fp16_ptr + first_byte, values_ptr, psw_ptr, HAS_PSW, 3, ROW_ALIGN, DIM_ALIGN, BLOCK_D)
        if mean != 0:
            acc = acc / tl.maximum(lengths, 1).to(tl.float32)[:, None]
        out_rows = tl.multiple_of(bags.to(tl.int64) * out_stride, DIM_ALIGN)  # out_stride: the sum of the dims
        tl.store(out_ptr + out_rows[:, None] + out_column + cols[None, :], acc, mask=bag_mask[:, None] & col_mask[None, :])
    total_bad_ids = tl.sum(bad_ids, axis=0)
    if total_bad_ids > 0:
        tl.atomic_add(bad_ids_ptr + f, total_bad_ids.to(tl.int64))


def quant_fwd(buffers, batch, meta: torch.Tensor, out: torch.Tensor, bad_ids: torch.Tensor, max_dim: int,
              row_align: int, dim_align: int, short: int = 0) -> None:
    """Pool every feature of the quantized tables into ``out``, in one launch.

    Args:
        buffers: the INT8, INT4 and FP16 storage types' flat uint8 buffers (any may be empty).
        batch: the op layer's ``OpBatch``: ``values`` ``[N]`` ids; ``offsets`` ``[K*B+1]`` bag
            starts, key-major; ``per_sample_weights`` ``[N]`` float, or None.
        meta: ``[F, QMETA_FIELDS]`` int64 (see above).
        out: ``[B, total_dim]`` fp32, written in full; bad_ids: ``[F]`` int64 counts of bad ids.
        row_align: a power of two dividing every row stride and table offset; dim_align: one
            dividing every dim (hence every output column).
        short: 0 pools every bag; 1 or 2 only the bags longer than that (``out``'s other rows
            left as they are), after ``quant_fwd_short`` pooled the rest.
    """
    num_features, batch_size = meta.shape[0], out.shape[0]
    if num_features == 0 or batch_size == 0:
        return
    # an empty buffer still needs an address: hand the kernel a live one in its place
    live = next(b for b in buffers if b.numel())
    per_sample_weights = batch.per_sample_weights
    grid = lambda cfg: (triton.cdiv(batch_size, cfg["BLOCK_B"]), num_features)  # noqa: E731
    wrap_triton(_quant_fwd_kernel)[grid](
        *[b if b.numel() else live for b in buffers], batch.values, batch.offsets,
        per_sample_weights if per_sample_weights is not None else out, meta, out, bad_ids,
        batch_size, out.stride(0), num_features,
        HAS_PSW=per_sample_weights is not None, BLOCK_D=block_d(max_dim), ROW_ALIGN=row_align, DIM_ALIGN=dim_align,
        SHORT=short)
