"""Forward of pooled embedding bags for short bags (DLRM's one id per bag): persistent and
pipelined across blocks.

``pooled_fwd`` pools a block of bags with a chain of dependent loads: the feature's metadata,
then the bags' offsets, then the ids, then the rows. A block of one-id bags moves one row per
bag, so that chain of four DRAM round trips is most of its time. Here a fixed grid of
programs walks the blocks (block ``k`` is ``BLOCK_B`` samples of one feature), and iteration
``i`` of a program's loop overlaps four of its blocks:

* the metadata (and VBE inverse indices) of block ``i+3``,
* the offsets of block ``i+2``,
* the first ``SHORT`` ids (and per-sample weights) of block ``i+1``,
* the rows of block ``i``,

then adds and stores block ``i-1``, whose rows the iteration before loaded. Every load
depends only on what the iteration before loaded, so an iteration waits for one round trip
however the four are chained. Bags longer than ``SHORT`` are left to a second launch
(``_long_bags_kernel``), whose programs return after one read of the offsets where their
bags are short: correct for any lengths, fast when few bags are long; the op layer picks
these kernels only for batches of short bags (``pooled_triton.short_length``).

Per bag the rows are added in position order onto zero, as ``pooled_fwd`` adds them, so an
fp32 SUM comes out with the same bits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import (META_DIM, META_FIELDS, META_KEY, META_MEAN, META_OUT_COLUMN, META_ROWS, META_WEIGHT_OFFSET,
                     block_d, interpreting, single_config, wrap_triton)
from .pooled_fwd import _gather
from .tuning import autotune

# the widest dim the kernel takes (one BLOCK_D tile per row); wider tables use pooled_fwd
MAX_DIM = 128


def enabled() -> bool:
    """Whether short-bag batches take this kernel (``JAGGEDREC_SHORT_BAGS=0`` sends them to
    ``pooled_fwd``, to time one against the other); read at each launch."""
    return os.environ.get("JAGGEDREC_SHORT_BAGS", "1") != "0"


def _configs():
    """(BLOCK_B, warps, programs per SM). The programs per SM are what the machine code allows
    at the fewest, for 64-wide tiles (sm_90a, triton 3.6 and 3.9, over dtypes, weights, VBE and
    SHORT): B32/4 warps 159-253 registers (2 programs per SM by registers), B16/4 warps 122-168
    (3), B32/8 warps 122-177 (1). A persistent grid larger than what fits would leave its last
    programs to run after the others, so the grid asks for the smaller count."""
    if single_config():
        return [triton.Config({"BLOCK_B": 4, "PROGRAMS_PER_SM": 1}, num_warps=1)]
    return [triton.Config({"BLOCK_B": b, "PROGRAMS_PER_SM": p}, num_warps=w) for b, w, p in [(32, 4, 2), (16, 4, 3),
                                                                                           (32, 8, 1)]]


@triton.jit
def _block_meta(k, num_blocks, blocks_per_feature, meta_ptr, inverse_ptr, batch_size, BLOCK_B: tl.constexpr,
                HAS_INVERSE: tl.constexpr, DIM_ALIGN: tl.constexpr):
    """Block ``k``: its feature's fields, its samples and the bags they pool (stage 1)."""
    live = k < num_blocks
    f = k // blocks_per_feature
    meta = meta_ptr + f.to(tl.int64) * META_FIELDS
    # multiples of DIM_ALIGN (see pooled_fwd): the row loads and output stores vectorise
    weight_offset = tl.multiple_of(tl.load(meta + META_WEIGHT_OFFSET, mask=live, other=0), DIM_ALIGN)
    dim = tl.multiple_of(tl.load(meta + META_DIM, mask=live, other=0), DIM_ALIGN)
    num_rows = tl.load(meta + META_ROWS, mask=live, other=0)
    out_column = tl.multiple_of(tl.load(meta + META_OUT_COLUMN, mask=live, other=0), DIM_ALIGN)
    key = tl.load(meta + META_KEY, mask=live, other=0)
    mean = tl.load(meta + META_MEAN, mask=live, other=0)
    samples, sample_mask, bags = _samples(k, f, num_blocks, blocks_per_feature, inverse_ptr, batch_size, BLOCK_B,
                                          HAS_INVERSE)
    return f, weight_offset, dim, num_rows, out_column, key, mean, samples, sample_mask, bags


@triton.jit
def _samples(k, f, num_blocks, blocks_per_feature, inverse_ptr, batch_size, BLOCK_B: tl.constexpr,
             HAS_INVERSE: tl.constexpr):
    """Block ``k`` of feature ``f``: its ``[BLOCK_B]`` samples, which of them exist, and the bag
    slot each reads (its own, or its inverse index under VBE)."""
    samples = (k - f * blocks_per_feature) * BLOCK_B + tl.arange(0, BLOCK_B)
    # a vector compare for the block's liveness: the interpreter refuses scalar & vector masks
    sample_mask = (samples < batch_size) & ((samples * 0 + k) < num_blocks)
    if HAS_INVERSE:
        bags = tl.load(inverse_ptr + f.to(tl.int64) * batch_size + samples, mask=sample_mask, other=0)
    else:
        bags = samples
    return samples, sample_mask, bags


@triton.jit
def _bounds(offsets_ptr, key, bags, sample_mask, bag_stride):
    """The bags' offsets as loaded (stage 2): start and end, converted only by the iteration
    after, so that no iteration waits for a load it issued."""
    bag_ptrs = offsets_ptr + key * bag_stride + bags
    return tl.load(bag_ptrs, mask=sample_mask, other=0), tl.load(bag_ptrs + 1, mask=sample_mask, other=0)


@triton.jit
def _extent(bounds):
    """``[BLOCK_B]`` int64 first position and length of each bag, from :func:`_bounds`."""
    start = bounds[0].to(tl.int64)
    return start, bounds[1].to(tl.int64) - start


@triton.jit
def _ids_of(values_ptr, psw_ptr, starts, lengths, sample_mask, HAS_PSW: tl.constexpr, SHORT: tl.constexpr):
    """The first ``SHORT`` ids of each bag, and their per-sample weights (stage 3)."""
    ids = ()
    psw = ()
    for s in tl.static_range(SHORT):
        here = sample_mask & (s < lengths)
        ids = ids + (tl.load(values_ptr + starts + s, mask=here, other=0),)
        if HAS_PSW:
            psw = psw + (tl.load(psw_ptr + starts + s, mask=here, other=0.0),)  # converted where used
        else:
            psw = psw + (1.0,)
    return ids, psw


@triton.jit
def _rows_of(ids, lengths, sample_mask, num_rows, dim, weight_offset, weights_ptr, cols, SHORT: tl.constexpr):
    """The rows of those ids (stage 4), ``SHORT`` ``[BLOCK_B, BLOCK_D]`` tensors, and ``[BLOCK_B]``
    counts of bad ids among them (not loaded); the table's fields are ``[BLOCK_B]``, per sample
    (:func:`_row_fields`)."""
    rows = ()
    bad_ids = tl.zeros(lengths.shape, dtype=tl.int32)
    col_mask = cols[None, :] < dim[:, None]
    for s in tl.static_range(SHORT):
        row = ids[s].to(tl.int64)
        here = sample_mask & (s < lengths)
        bad = here & ((row < 0) | (row >= num_rows))
        bad_ids += bad.to(tl.int32)
        rows = rows + (tl.load(weights_ptr + weight_offset[:, None] + row[:, None] * dim[:, None] + cols[None, :],
                               mask=(here & ~bad)[:, None] & col_mask, other=0.0),)
    return rows, bad_ids


@triton.jit
def _lane_field(meta, field, samples, mask, ALIGN: tl.constexpr, WIDE: tl.constexpr = True):
    """A feature's metadata field loaded once per sample (``[BLOCK_B]``, 0 where ``mask`` is off).
    Loaded as a scalar, a field the loop carries to a later iteration went into a uniform
    register, which ptxas filled in the iteration that loaded it: that iteration then waited for
    the load. A value that differs by lane stays in the register it was loaded into. Not
    ``WIDE``: the field's low 32 bits (it is below 2^31), a register a sample instead of two."""
    if WIDE:
        value = tl.load(meta + field + samples * 0, mask=mask, other=0)
    else:
        value = tl.load(meta.to(tl.pointer_type(tl.int32), bitcast=True) + 2 * field + samples * 0, mask=mask,
                        other=0)
    return tl.multiple_of(value, ALIGN)


@triton.jit
def _block(k, num_blocks, blocks_per_feature, meta_ptr, inverse_ptr, batch_size, BLOCK_B: tl.constexpr,
           HAS_INVERSE: tl.constexpr):
    """Block ``k`` (stage 1): its feature, samples, which of them exist, the bags they pool and,
    per sample, the key of those bags' offsets. Each other field of the feature is loaded by
    the stage before the one that uses it (:func:`_row_fields`, :func:`_out_fields`), so that
    no field is held for more than one iteration."""
    f = k // blocks_per_feature
    samples, sample_mask, bags = _samples(k, f, num_blocks, blocks_per_feature, inverse_ptr, batch_size, BLOCK_B,
                                          HAS_INVERSE)
    key = _lane_field(meta_ptr + f.to(tl.int64) * META_FIELDS, META_KEY, samples, sample_mask, 1, False)
    return f, samples, sample_mask, bags, key


@triton.jit
def _row_fields(block, meta_ptr, DIM_ALIGN: tl.constexpr):
    """Per sample, the fields that locate the block's rows (loaded in stage 3, used in stage 4):
    the table's first element (a multiple of DIM_ALIGN, see pooled_fwd: the row loads
    vectorise), its dim and its row count."""
    meta = meta_ptr + block[0].to(tl.int64) * META_FIELDS
    return (_lane_field(meta, META_WEIGHT_OFFSET, block[1], block[2], DIM_ALIGN, True),
            _lane_field(meta, META_DIM, block[1], block[2], DIM_ALIGN, False),
            _lane_field(meta, META_ROWS, block[1], block[2], 1, True))


@triton.jit
def _out_fields(block, meta_ptr, DIM_ALIGN: tl.constexpr):
    """Per sample, the fields the block's store needs (loaded in stage 4): output column, MEAN."""
    meta = meta_ptr + block[0].to(tl.int64) * META_FIELDS
    return (_lane_field(meta, META_OUT_COLUMN, block[1], block[2], DIM_ALIGN, False),
            _lane_field(meta, META_MEAN, block[1], block[2], 1, False))


@triton.jit
def _dead_block(first, inverse_ptr, BLOCK_B: tl.constexpr, HAS_INVERSE: tl.constexpr):
    """A block before the program's first, as :func:`_block` gives one, with no sample: what the
    pipeline holds before the loop fills it. Each stage gets its own values, so that Triton
    carries each through the loop (stages built from one set of values would read as unchanged)."""
    lanes = tl.arange(0, BLOCK_B)
    if HAS_INVERSE:
        bags = tl.zeros([BLOCK_B], dtype=inverse_ptr.dtype.element_ty)
    else:
        bags = lanes
    return first * 0, lanes, lanes < 0, bags, tl.zeros([BLOCK_B], dtype=tl.int32)


@triton.jit
def _dead_ids(weights_ptr, values_ptr, psw_ptr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PSW: tl.constexpr,
              SHORT: tl.constexpr):
    """A dead block's rows, ids and per-sample weights (zeros, as loaded under masks all off)."""
    rows = ()
    ids = ()
    psw = ()
    for s in tl.static_range(SHORT):
        rows = rows + (tl.zeros([BLOCK_B, BLOCK_D], dtype=weights_ptr.dtype.element_ty),)
        ids = ids + (tl.zeros([BLOCK_B], dtype=values_ptr.dtype.element_ty),)
        if HAS_PSW:
            psw = psw + (tl.zeros([BLOCK_B], dtype=psw_ptr.dtype.element_ty),)
        else:
            psw = psw + (1.0,)
    return rows, ids, psw


@triton.jit
def _long_bags_kernel(weights_ptr, values_ptr, offsets_ptr, psw_ptr, inverse_ptr, meta_ptr, out_ptr, bad_ids_ptr,
                      batch_size, bag_stride, out_stride, HAS_PSW: tl.constexpr, HAS_INVERSE: tl.constexpr,
                      BLOCK_D: tl.constexpr, DIM_ALIGN: tl.constexpr, SHORT: tl.constexpr, BLOCK_B: tl.constexpr):
    """The bags longer than ``SHORT``, which the pipelined kernel leaves alone: one program per
    ``BLOCK_B`` samples of one feature, that returns after reading the offsets where its bags
    are all short, and otherwise pools its long bags whole, position by position from zero
    (the order of ``pooled_fwd``), counting their bad ids."""
    f = tl.program_id(1)
    m = _block_meta(f * tl.num_programs(0) + tl.program_id(0), tl.num_programs(0) * tl.num_programs(1),
                    tl.num_programs(0), meta_ptr, inverse_ptr, batch_size, BLOCK_B, HAS_INVERSE, DIM_ALIGN)
    _, weight_offset, dim, num_rows, out_column, key, mean, samples, sample_mask, bags = m
    starts = tl.load(offsets_ptr + key * bag_stride + bags, mask=sample_mask, other=0).to(tl.int64)
    lengths = tl.load(offsets_ptr + key * bag_stride + bags + 1, mask=sample_mask, other=0).to(tl.int64) - starts
    long = sample_mask & (lengths > SHORT)
    longest = tl.max(tl.where(long, lengths, 0), axis=0)
    if longest > 0:
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        bad_ids = tl.zeros([BLOCK_B], dtype=tl.int32)
        # the general forward's pipelined loop, over the long bags only (a short bag reads as empty)
        acc, bad_ids = _gather(acc, bad_ids, 0, cols, col_mask, starts, tl.where(long, lengths, 0), longest, num_rows,
                               dim, weights_ptr + weight_offset, values_ptr, psw_ptr, 0, 0, HAS_PSW, False, 1)
        if mean != 0:
            acc = acc / tl.maximum(lengths, 1).to(tl.float32)[:, None]
        out_rows = tl.multiple_of(samples.to(tl.int64) * out_stride, DIM_ALIGN)
        tl.store(out_ptr + out_rows[:, None] + out_column + cols[None, :], acc, mask=long[:, None] & col_mask[None, :])
        total_bad = tl.sum(bad_ids, axis=0)
        if total_bad > 0:
            tl.atomic_add(bad_ids_ptr + f, total_bad.to(tl.int64))


def _keep(config, args) -> bool:
    """32 bags on 4 warps only at tiles up to 64 wide: at 128, twice the row registers took 255
    and spilled in the loop (sm_90a, triton 3.6 and 3.9), and the launch's one program per SM
    holds the 32 bags that 32 on 8 warps holds with twice the warps."""
    return not (config.kwargs["BLOCK_B"] == 32 and config.num_warps == 4 and args["BLOCK_D"] > 64)


@autotune(configs=_configs(), key=["num_features", "BLOCK_D", "HAS_PSW", "DIM_ALIGN", "HAS_INVERSE", "SHORT"],
          keep=_keep)
@triton.jit
def _pooled_fwd_short_kernel(
    weights_ptr, values_ptr, offsets_ptr, psw_ptr, inverse_ptr, meta_ptr, out_ptr, bad_ids_ptr,
    batch_size, bag_stride, out_stride, num_features,
    HAS_PSW: tl.constexpr, HAS_INVERSE: tl.constexpr, BLOCK_D: tl.constexpr, DIM_ALIGN: tl.constexpr,
    SHORT: tl.constexpr, BLOCK_B: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    blocks_per_feature = tl.cdiv(batch_size, BLOCK_B)
    num_blocks = blocks_per_feature * num_features
    step = tl.num_programs(0)
    first = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)

    # the pipeline starts empty: four dead blocks (masks off, nothing loaded) ahead of this
    # program's first, which the loop's first iteration takes as its block 4. A fill of its own
    # waited on its loads one by one (21 round trips, weighted bf16 on triton 3.9); the dead
    # iterations take one each.
    b0 = _dead_block(first, inverse_ptr, BLOCK_B, HAS_INVERSE)
    b1 = _dead_block(first, inverse_ptr, BLOCK_B, HAS_INVERSE)
    b2 = _dead_block(first, inverse_ptr, BLOCK_B, HAS_INVERSE)
    b3 = _dead_block(first, inverse_ptr, BLOCK_B, HAS_INVERSE)
    lengths0 = tl.zeros([BLOCK_B], dtype=tl.int64)
    lengths1 = tl.zeros([BLOCK_B], dtype=tl.int64)
    rows0, _, psw0 = _dead_ids(weights_ptr, values_ptr, psw_ptr, BLOCK_B, BLOCK_D, HAS_PSW, SHORT)
    _, ids1, psw1 = _dead_ids(weights_ptr, values_ptr, psw_ptr, BLOCK_B, BLOCK_D, HAS_PSW, SHORT)
    bad0 = tl.zeros([BLOCK_B], dtype=tl.int32)
    out0 = (tl.zeros([BLOCK_B], dtype=tl.int32), tl.zeros([BLOCK_B], dtype=tl.int32))
    dim0 = tl.zeros([BLOCK_B], dtype=tl.int32)
    fields1 = (tl.zeros([BLOCK_B], dtype=tl.int64), tl.zeros([BLOCK_B], dtype=tl.int32),
               tl.zeros([BLOCK_B], dtype=tl.int64))
    bounds2 = (tl.zeros([BLOCK_B], dtype=offsets_ptr.dtype.element_ty),
               tl.zeros([BLOCK_B], dtype=offsets_ptr.dtype.element_ty))

    for k in range(first - 4 * step, num_blocks, step):
        # block k is 0; issue the rows of 1 (and its store's fields), the ids of 2 (and its rows'
        # fields), the offsets of 3, the key of 4
        rows1, bad1 = _rows_of(ids1, lengths1, b1[2], fields1[2], fields1[1], fields1[0], weights_ptr, cols, SHORT)
        out1 = _out_fields(b1, meta_ptr, DIM_ALIGN)
        starts2, lengths2 = _extent(bounds2)
        ids2, psw2 = _ids_of(values_ptr, psw_ptr, starts2, lengths2, b2[2], HAS_PSW, SHORT)
        fields2 = _row_fields(b2, meta_ptr, DIM_ALIGN)
        bounds3 = _bounds(offsets_ptr, b3[4], b3[3], b3[2], bag_stride)
        b4 = _block(k + 4 * step, num_blocks, blocks_per_feature, meta_ptr, inverse_ptr, batch_size, BLOCK_B,
                    HAS_INVERSE)

        # add and store block k (its rows arrived during the iteration before)
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(SHORT):
            if HAS_PSW:
                acc += rows0[s].to(tl.float32) * psw0[s].to(tl.float32)[:, None]
            else:
                acc += rows0[s].to(tl.float32)
        # MEAN per sample: a SUM bag keeps its sum as it is
        acc = tl.where((out0[1] != 0)[:, None], acc / tl.maximum(lengths0, 1).to(tl.float32)[:, None], acc)
        short = b0[2] & (lengths0 <= SHORT)  # longer bags: _long_bags_kernel's
        out_rows = tl.multiple_of(b0[1].to(tl.int64) * out_stride, DIM_ALIGN)
        tl.store(out_ptr + out_rows[:, None] + out0[0][:, None] + cols[None, :], acc,
                 mask=short[:, None] & (cols[None, :] < dim0[:, None]))
        total_bad = tl.sum(tl.where(short, bad0, 0), axis=0)
        if total_bad > 0:
            tl.atomic_add(bad_ids_ptr + b0[0], total_bad.to(tl.int64))

        # shift the pipeline by one block
        b0, lengths0, rows0, psw0, bad0, out0, dim0 = b1, lengths1, rows1, psw1, bad1, out1, fields1[1]
        b1, lengths1, ids1, psw1, fields1 = b2, lengths2, ids2, psw2, fields2
        b2, bounds2 = b3, bounds3
        b3 = b4


def _multiprocessors(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def pooled_fwd_short(weights: torch.Tensor, batch, meta: torch.Tensor, out: torch.Tensor, bad_ids: torch.Tensor,
                     max_dim: int, alignment: int, bag_stride: int, short: int) -> None:
    """As ``pooled_fwd.pooled_fwd`` (same arguments, same output), for batches of short bags;
    ``short`` is ``SHORT``, the ids per bag the pipeline loads (1 or 2; the op layer's
    ``pooled_triton.short_length`` picks it)."""
    num_features = meta.shape[0]
    batch_size = out.shape[0]
    if num_features == 0 or batch_size == 0:
        return
    assert meta.shape[1] == META_FIELDS and max_dim <= MAX_DIM
    per_sample_weights, inverse_indices = batch.per_sample_weights, batch.inverse_indices
    multiprocessors = _multiprocessors(weights.device)
    tile = block_d(max_dim)
    # a 128-wide tile doubles the rows' registers: one program fewer per SM (at least one)
    grid = lambda cfg: (multiprocessors * max(1, cfg["PROGRAMS_PER_SM"] - (tile > 64)),)  # noqa: E731
    wrap_triton(_pooled_fwd_short_kernel)[grid](
        weights, batch.values, batch.offsets, per_sample_weights if per_sample_weights is not None else out,
        inverse_indices.contiguous() if inverse_indices is not None else batch.offsets, meta, out, bad_ids,
        batch_size, bag_stride, out.stride(0), num_features,
        HAS_PSW=per_sample_weights is not None, HAS_INVERSE=inverse_indices is not None, BLOCK_D=tile,
        DIM_ALIGN=alignment, SHORT=short)
    long_block = (64 if tile <= 64 else 32) if not interpreting() else 4
    wrap_triton(_long_bags_kernel)[(triton.cdiv(batch_size, long_block), num_features)](
        weights, batch.values, batch.offsets, per_sample_weights if per_sample_weights is not None else out,
        inverse_indices.contiguous() if inverse_indices is not None else batch.offsets, meta, out, bad_ids,
        batch_size, bag_stride, out.stride(0), HAS_PSW=per_sample_weights is not None,
        HAS_INVERSE=inverse_indices is not None, BLOCK_D=block_d(max_dim), DIM_ALIGN=alignment, SHORT=short,
        BLOCK_B=long_block, num_warps=8)
