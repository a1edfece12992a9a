"""Probe and gather in one launch: pooled bags of hashed tables, read from raw ids.

Each program pools one bag (one feature's sample). For every id of the bag it hashes the id
(splitmix64's finaliser, as ``jaggedrec/ops/hash_probe_torch.py``'s ``mix``), loads its
bucket's ``BUCKET_SIZE`` keys in one vector load, and reads the row of the slot that holds the
id, or the table's fallback row when none does; static features read row ``id``. The row is
accumulated in registers: no remapped id is written to memory and read back. Each program
adds its fallback reads to its feature's count (one atomic per bag).

Per feature, ``meta`` holds ``HASH_FIELDS`` int64 fields at the ``HASH_*`` offsets below.
"""

from __future__ import annotations

import triton
import triton.language as tl

HASH_WEIGHT_OFFSET, HASH_DIM, HASH_OUT_COLUMN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
HASH_MEAN, HASH_HASHED, HASH_BUCKET_BASE = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5)
HASH_NUM_BUCKETS, HASH_SLOT_BASE, HASH_FALLBACK = tl.constexpr(6), tl.constexpr(7), tl.constexpr(8)
HASH_FIELDS = tl.constexpr(9)


@triton.jit
def _mix(x):
    """splitmix64's finaliser on int64 (wrapping multiplies, logical shifts by masks)."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


@triton.jit
def hash_probe_pooled_kernel(values_ptr, offsets_ptr, keys_ptr, weight_ptr, out_ptr, meta_ptr, fallback_ptr,
                             batch_size, out_stride, BUCKET_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[b, col:col+dim]`` = the pooled rows of bag ``pid`` (feature ``pid // batch_size``).

    values: ``[N]`` int32/int64 raw ids; offsets: ``[K*B+1]``; keys: ``[num_slots + 1]`` int64
    (``EMPTY`` = int64 min where free); weight: the flat fp32 storage; out: ``[B, out_stride]``
    fp32; meta: ``[K, HASH_FIELDS]`` int64; fallback: ``[K]`` int64 counts (added to).
    """
    bag = tl.program_id(0)
    feature = bag // batch_size
    sample = bag % batch_size
    meta = meta_ptr + feature * HASH_FIELDS
    w_offset = tl.load(meta + HASH_WEIGHT_OFFSET)
    dim = tl.load(meta + HASH_DIM)
    out_column = tl.load(meta + HASH_OUT_COLUMN)
    mean = tl.load(meta + HASH_MEAN)
    hashed = tl.load(meta + HASH_HASHED) != 0
    bucket_base = tl.load(meta + HASH_BUCKET_BASE)
    num_buckets = tl.load(meta + HASH_NUM_BUCKETS)
    slot_base = tl.load(meta + HASH_SLOT_BASE)
    fallback_row = tl.load(meta + HASH_FALLBACK)
    start = tl.load(offsets_ptr + bag).to(tl.int64)
    end = tl.load(offsets_ptr + bag + 1).to(tl.int64)
    slots = tl.arange(0, BUCKET_SIZE)
    cols = tl.arange(0, BLOCK_D)
    misses = 0
    for d0 in range(0, dim, BLOCK_D):
        col_mask = (d0 + cols) < dim
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p in range(start, end):
            raw = tl.load(values_ptr + p).to(tl.int64)
            h = _mix(raw)
            bucket = bucket_base + (h & 0x7FFFFFFFFFFFFFFF) % num_buckets
            window = tl.load(keys_ptr + bucket * BUCKET_SIZE + slots)
            match = window == raw
            found = tl.max(match.to(tl.int32), 0) > 0
            slot = tl.min(tl.where(match, slots, BUCKET_SIZE), 0)
            row = tl.where(found, bucket * BUCKET_SIZE + slot - slot_base, fallback_row)
            row = tl.where(hashed, row, raw)
            misses += (hashed & ~found & (d0 == 0)).to(tl.int32)
            acc += tl.load(weight_ptr + w_offset + row * dim + d0 + cols, mask=col_mask, other=0.0).to(tl.float32)
        if mean != 0:
            acc = acc / tl.maximum(end - start, 1).to(tl.float32)
        tl.store(out_ptr + sample * out_stride + out_column + d0 + cols, acc, mask=col_mask)
    if hashed:
        tl.atomic_add(fallback_ptr + feature, misses.to(tl.int64))
