"""Forward of quantized embedding bags for short bags (DLRM's one id per bag): persistent and
pipelined across blocks, one launch per storage type.

``quant_fwd`` pools a block of bags behind a chain of dependent loads (the feature's
metadata, the bags' offsets, the ids, then the rows, with their scales and biases): at one
id per bag that chain is most of a program's time. Here, as in ``pooled_fwd_short``, a
fixed grid of programs walks the blocks of one storage type's features (block ``k``:
``BLOCK_B`` bags of one feature), and iteration ``i`` of a program's loop issues

* the key (which offsets its bags read) of block ``i+3``,
* the offsets of block ``i+2`` (as loaded: converted in the next iteration),
* the first ``SHORT`` ids of block ``i+1``, and the fields that locate its rows,
* the rows (codes, scale and bias, per-id weights) of block ``i``, and the fields its store needs,

then dequantizes, adds and stores block ``i-1``, whose rows the iteration before loaded. No
load is waited for in the iteration that issues it, so a block costs one DRAM round trip.
INT8 and INT4 codes are loaded and carried as 32-bit words (``quant_fwd._fetch``'s WORDS).
The storage type is a constexpr (``STORAGE``): a kernel holds one dequantizing loop, not
three, which keeps its registers to what one needs. Bags longer than ``SHORT`` are left to
``quant_fwd``'s kernel launched with ``SHORT`` (it pools those only, and its programs return
after one read of the offsets where all their bags are short).

Per bag the dequantized rows are added in position order onto zero, as ``quant_fwd`` adds
them, so the output has the same bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    META_DIM,
    META_KEY,
    META_MEAN,
    META_OUT_COLUMN,
    META_ROWS,
    META_WEIGHT_OFFSET,
    block_d,
    single_config,
    wrap_triton,
)
from .pooled_fwd_short import _multiprocessors
from .quant_fwd import QMETA_FEATURE, QMETA_FIELDS, QMETA_ROW_BYTES, _dequantize, _fetch
from .tuning import autotune

# the widest dim the kernel takes (one BLOCK_D tile per row); wider tables use quant_fwd alone
MAX_DIM = 128


def _configs():
    """(BLOCK_B, warps, programs per SM). The programs per SM are what the machine code of the
    hungriest storage loop allows (sm_90a, triton 3.6 and 3.9, dim 128, weighted or not): a
    persistent grid larger than what fits would leave its last programs to run after the rest.
    32 bags at 4 warps give INT4 rows of dim 128 their 16-byte loads (see quant_fwd)."""
    if single_config():
        return [triton.Config({"BLOCK_B": 4, "PROGRAMS_PER_SM": 1}, num_warps=1)]
    return [triton.Config({"BLOCK_B": b, "PROGRAMS_PER_SM": 2}, num_warps=4) for b in (32, 16)]


def _keep(config, args) -> bool:
    """INT8 rows at two ids a bag and 128-wide tiles take 16 bags a program, all else 32: at 32,
    two positions' codes, scales and biases took 255 registers and spilled in the loop (triton
    3.9). 2 programs of 16 bags per SM hold half the rows of 2 of 32, at half the round trips
    per block that the 32-bag loop took before it loaded its fields per bag (2)."""
    if config.kwargs["BLOCK_B"] not in (16, 32):  # JAGGEDREC_AUTOTUNE=0's lone config
        return True
    return (config.kwargs["BLOCK_B"] == 16) == (args["STORAGE"] == 1 and args["SHORT"] == 2 and args["BLOCK_D"] > 64)


@triton.jit
def _block(k, num_blocks, blocks_per_feature, meta_ptr):
    """Block ``k`` (stage 1): its feature, and the key of its bags' offsets (as loaded). Each of
    a feature's other fields is loaded by the stage before the one that uses it, not here: four
    blocks are in flight at once, and all their fields held for four iterations took the
    registers that the rows needed (ptxas then moved fields to uniform registers as soon as
    they came in, waiting for them in the iteration that loaded them)."""
    f = k // blocks_per_feature
    key = tl.load(meta_ptr + f.to(tl.int64) * QMETA_FIELDS + META_KEY, mask=k < num_blocks, other=0)
    return k, f, key


@triton.jit
def _bags_of(block, num_blocks, blocks_per_feature, batch_size, BLOCK_B: tl.constexpr):
    """``[BLOCK_B]`` bags of ``block`` (from :func:`_block`) and which of them exist."""
    bags = (block[0] - block[1] * blocks_per_feature) * BLOCK_B + tl.arange(0, BLOCK_B)
    # a vector compare for the block's liveness: the interpreter refuses scalar & vector masks
    return bags, (bags < batch_size) & ((bags * 0 + block[0]) < num_blocks)


@triton.jit
def _bounds(offsets_ptr, block, num_blocks, blocks_per_feature, batch_size, BLOCK_B: tl.constexpr):
    """The bags' offsets as loaded (stage 2), converted by the iteration after."""
    bags, bag_mask = _bags_of(block, num_blocks, blocks_per_feature, batch_size, BLOCK_B)
    bag_ptrs = offsets_ptr + block[2].to(tl.int64) * batch_size + bags
    return tl.load(bag_ptrs, mask=bag_mask, other=0), tl.load(bag_ptrs + 1, mask=bag_mask, other=0)


@triton.jit
def _extent(bounds):
    start = bounds[0].to(tl.int64)
    return start, (bounds[1].to(tl.int64) - start).to(tl.int32)


@triton.jit
def _ids_of(values_ptr, starts, lengths, SHORT: tl.constexpr):
    """The first ``SHORT`` ids of each bag (stage 3); masked-off bags have length 0."""
    ids = ()
    for s in tl.static_range(SHORT):
        ids = ids + (tl.load(values_ptr + starts + s, mask=s < lengths, other=0),)
    return ids


@triton.jit
def _lane_field(meta, field, lanes, mask, ALIGN: tl.constexpr, WIDE: tl.constexpr = False):
    """A feature's metadata field loaded once per bag (``[BLOCK_B]``, 0 where ``mask`` is off):
    loaded as a scalar, a field the loop carries to the next iteration went into a uniform
    register, which ptxas filled in the iteration that loaded it (waiting for the load there);
    a value that differs by lane stays in the register it was loaded into. Not ``WIDE``: the
    field's low 32 bits (it is below 2^31), one register a bag instead of two."""
    if WIDE:
        value = tl.load(meta + field + lanes * 0, mask=mask, other=0)
    else:
        value = tl.load(meta.to(tl.pointer_type(tl.int32), bitcast=True) + 2 * field + lanes * 0, mask=mask, other=0)
    return tl.multiple_of(value, ALIGN)


@triton.jit
def _row_fields(block, lengths, bag_mask, num_blocks, meta_ptr, ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr):
    """The fields that locate the block's rows (loaded in stage 3, used in stage 4): the table's
    first byte and row stride (scalars), and per bag the dim (which the store uses too) and
    the row count. The dim and stride fit 32 bits; the byte offset and the row count stay
    64-bit (tables past 2 GiB; ids checked against the count in 64)."""
    live = block[0] < num_blocks
    meta = meta_ptr + block[1].to(tl.int64) * QMETA_FIELDS
    first_byte = tl.multiple_of(tl.load(meta + META_WEIGHT_OFFSET, mask=live, other=0), ROW_ALIGN)
    dim = _lane_field(meta, META_DIM, lengths, bag_mask, DIM_ALIGN)
    num_rows = _lane_field(meta, META_ROWS, lengths, lengths > 0, 1, True)
    row_bytes = tl.multiple_of(tl.load(meta + QMETA_ROW_BYTES, mask=live, other=0), ROW_ALIGN)
    return first_byte, dim, num_rows, row_bytes


@triton.jit
def _out_fields(block, lengths, bag_mask, num_blocks, meta_ptr, DIM_ALIGN: tl.constexpr):
    """The fields the block's store needs (loaded in stage 4): per bag the output column and the
    feature's index for its bad-id count, and MEAN (a scalar: ptxas waited for no load of it)."""
    meta = meta_ptr + block[1].to(tl.int64) * QMETA_FIELDS
    mean = tl.load(meta + META_MEAN, mask=block[0] < num_blocks, other=0).to(tl.int32)
    return (_lane_field(meta, META_OUT_COLUMN, lengths, bag_mask, DIM_ALIGN), mean,
            _lane_field(meta, QMETA_FEATURE, lengths, bag_mask, 1),
            _lane_field(meta, META_DIM, lengths, bag_mask, DIM_ALIGN))


@triton.jit
def _rows_of(ids, starts, lengths, fields, table_ptr, psw_ptr, cols, HAS_PSW: tl.constexpr, STORAGE: tl.constexpr,
             ROW_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr, SHORT: tl.constexpr, BLOCK_D: tl.constexpr,
             WORDS: tl.constexpr):
    """The rows of those ids as stored (stage 4), one :func:`quant_fwd._fetch` tuple per
    position, and ``[BLOCK_B]`` counts of bad ids among them (not loaded)."""
    fetched = ()
    bad_ids = tl.zeros(lengths.shape, dtype=tl.int32)
    col_mask = cols[None, :] < fields[1][:, None]
    for s in tl.static_range(SHORT):
        raw, present, psw, bad = _fetch(table_ptr + fields[0], ids[s], s, starts, lengths, fields[2], 0, cols,
                                        col_mask, fields[1][:, None], fields[3], psw_ptr, HAS_PSW, STORAGE,
                                        ROW_ALIGN, DIM_ALIGN, BLOCK_D, WORDS, True)
        fetched = fetched + ((raw, present, psw),)
        bad_ids += bad
    return fetched, bad_ids


@autotune(configs=_configs(), key=["num_features", "BLOCK_D", "HAS_PSW", "STORAGE", "ROW_ALIGN", "DIM_ALIGN",
                                   "SHORT"], keep=_keep)
@triton.jit
def _quant_fwd_short_kernel(
    table_ptr, values_ptr, offsets_ptr, psw_ptr, meta_ptr, out_ptr, bad_ids_ptr,
    batch_size, out_stride, num_features,
    HAS_PSW: tl.constexpr, STORAGE: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DIM_ALIGN: tl.constexpr, SHORT: tl.constexpr, BLOCK_B: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    blocks_per_feature = tl.cdiv(batch_size, BLOCK_B)
    num_blocks = blocks_per_feature * num_features
    step = tl.num_programs(0)
    first = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    # codes as 32-bit words (see quant_fwd._fetch); FP16 values as loaded, which read 1 round trip
    # where words read 2 (fp16 dim 64, SHORT=1, triton 3.6)
    WORDS: tl.constexpr = ROW_ALIGN >= 4 and STORAGE != 3

    # fill the pipeline as the loop keeps it: rows of block 0, ids of 1, offsets of 2, key of 3
    b0 = _block(first, num_blocks, blocks_per_feature, meta_ptr)
    b1 = _block(first + step, num_blocks, blocks_per_feature, meta_ptr)
    b2 = _block(first + 2 * step, num_blocks, blocks_per_feature, meta_ptr)
    b3 = _block(first + 3 * step, num_blocks, blocks_per_feature, meta_ptr)
    starts0, lengths0 = _extent(_bounds(offsets_ptr, b0, num_blocks, blocks_per_feature, batch_size, BLOCK_B))
    starts1, lengths1 = _extent(_bounds(offsets_ptr, b1, num_blocks, blocks_per_feature, batch_size, BLOCK_B))
    bounds2 = _bounds(offsets_ptr, b2, num_blocks, blocks_per_feature, batch_size, BLOCK_B)
    ids0 = _ids_of(values_ptr, starts0, lengths0, SHORT)
    fields0 = _row_fields(b0, lengths0, _bags_of(b0, num_blocks, blocks_per_feature, batch_size, BLOCK_B)[1],
                          num_blocks, meta_ptr, ROW_ALIGN, DIM_ALIGN)
    rows0, bad0 = _rows_of(ids0, starts0, lengths0, fields0, table_ptr, psw_ptr, cols, HAS_PSW, STORAGE, ROW_ALIGN,
                           DIM_ALIGN, SHORT, BLOCK_D, WORDS)
    out0 = _out_fields(b0, lengths0, _bags_of(b0, num_blocks, blocks_per_feature, batch_size, BLOCK_B)[1], num_blocks,
                       meta_ptr, DIM_ALIGN)
    ids1 = _ids_of(values_ptr, starts1, lengths1, SHORT)
    fields1 = _row_fields(b1, lengths1, _bags_of(b1, num_blocks, blocks_per_feature, batch_size, BLOCK_B)[1],
                          num_blocks, meta_ptr, ROW_ALIGN, DIM_ALIGN)

    for k in range(first, num_blocks, step):
        # block k is 0; issue the rows of 1 (and its store's fields), the ids of 2 (and its rows'
        # fields), the offsets of 3, the key of 4
        rows1, bad1 = _rows_of(ids1, starts1, lengths1, fields1, table_ptr, psw_ptr, cols, HAS_PSW, STORAGE,
                               ROW_ALIGN, DIM_ALIGN, SHORT, BLOCK_D, WORDS)
        out1 = _out_fields(b1, lengths1, _bags_of(b1, num_blocks, blocks_per_feature, batch_size, BLOCK_B)[1],
                           num_blocks, meta_ptr, DIM_ALIGN)
        starts2, lengths2 = _extent(bounds2)
        ids2 = _ids_of(values_ptr, starts2, lengths2, SHORT)
        fields2 = _row_fields(b2, lengths2, _bags_of(b2, num_blocks, blocks_per_feature, batch_size, BLOCK_B)[1],
                              num_blocks, meta_ptr, ROW_ALIGN, DIM_ALIGN)
        bounds3 = _bounds(offsets_ptr, b3, num_blocks, blocks_per_feature, batch_size, BLOCK_B)
        b4 = _block(k + 4 * step, num_blocks, blocks_per_feature, meta_ptr)

        # dequantize, add and store block k (its rows arrived during the iteration before)
        col_mask = cols[None, :] < out0[3][:, None]
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(SHORT):
            rows = _dequantize(rows0[s][0], rows0[s][1], col_mask, STORAGE, WORDS)
            if HAS_PSW:
                rows = rows * rows0[s][2][:, None]
            acc += rows
        if out0[1] != 0:
            acc = acc / tl.maximum(lengths0, 1).to(tl.float32)[:, None]
        bags0, bag_mask0 = _bags_of(b0, num_blocks, blocks_per_feature, batch_size, BLOCK_B)
        short = bag_mask0 & (lengths0 <= SHORT)  # longer bags: quant_fwd's pass with SHORT
        out_rows = tl.multiple_of(bags0.to(tl.int64) * out_stride, DIM_ALIGN)
        tl.store(out_ptr + out_rows[:, None] + out0[0][:, None] + cols[None, :], acc, mask=short[:, None] & col_mask)
        total_bad = tl.sum(tl.where(short, bad0, 0), axis=0)
        if total_bad > 0:
            # per bag, at its feature's count (a field per bag, as above): the same integer sum
            tl.atomic_add(bad_ids_ptr + out0[2], bad0.to(tl.int64), mask=short & (bad0 > 0))

        # shift the pipeline by one block
        b0, lengths0, rows0, bad0, out0 = b1, lengths1, rows1, bad1, out1
        b1, starts1, lengths1, ids1, fields1 = b2, starts2, lengths2, ids2, fields2
        b2, bounds2 = b3, bounds3
        b3 = b4


def quant_fwd_short(buffer, values, offsets, per_sample_weights, meta, out, bad_ids, max_dim: int, storage: int,
                    row_align: int, dim_align: int, short: int) -> None:
    """Pool the bags of at most ``short`` ids of the features in ``meta`` (all of one storage
    type, ``storage``: 1 INT8, 2 INT4, 3 FP16, whose flat uint8 ``buffer`` they read) into
    ``out``; ``meta`` is ``[F_s, QMETA_FIELDS]`` rows of ``quant_fwd``'s metadata, whose
    QMETA_FEATURE field names the ``bad_ids`` entry each counts into. Longer bags are left
    for ``quant_fwd.quant_fwd(..., short=short)``. Arguments otherwise as ``quant_fwd``."""
    num_features, batch_size = meta.shape[0], out.shape[0]
    if num_features == 0 or batch_size == 0:
        return
    assert max_dim <= MAX_DIM and 1 <= short <= 2
    tile = block_d(max_dim)
    grid = lambda cfg: (_multiprocessors(out.device) * cfg["PROGRAMS_PER_SM"],)
    wrap_triton(_quant_fwd_short_kernel)[grid](
        buffer, values, offsets, per_sample_weights if per_sample_weights is not None else out, meta, out, bad_ids,
        batch_size, out.stride(0), num_features,
        HAS_PSW=per_sample_weights is not None, STORAGE=storage, BLOCK_D=tile, ROW_ALIGN=row_align,
        DIM_ALIGN=dim_align, SHORT=short)

