"""Probe and gather in one launch: pooled bags of hashed tables, read from raw ids.

Each program pools a block of ``BLOCK_B`` bags (consecutive (feature, sample) pairs), all
lanes at once, so that a block's ids, bucket keys and rows are each one wide load in flight
rather than one bag's. For the ``p``-th id of every bag it hashes the id (splitmix64's
finaliser, as ``jaggedrec/ops/hash_probe_torch.py``'s ``mix``), loads its bucket's
``BUCKET_SIZE`` keys, and reads the row of the slot that holds the id, or the table's fallback
row when none does; static features read row ``id``. Rows are accumulated in registers: no
remapped id is written to memory and read back. A lane that read a fallback row adds its
count to its feature's (an atomic only where there was one).

An id, its bucket's keys and its row are three dependent loads. The loop over positions is a
software pipeline that keeps one of each in flight: iteration ``q``

* adds the rows of position ``q-3`` (loaded by the iteration before),
* finds the slot of position ``q-2``'s id in its keys and loads its row,
* hashes position ``q-1``'s id and loads its bucket's keys,
* loads the ids of position ``q``,

so every load depends only on what the iteration before loaded, and an iteration waits for
one DRAM round trip, not three. The pipeline starts empty (positions -3 to -1 hold nothing,
masks off) instead of with fill code, and runs three iterations past the last position;
the first waits for nothing, so a block of bags of at most ``L`` ids costs ``L + 2`` round
trips after the offsets. A bag's rows are added in position order onto zero, as before the
pipeline, so the sums keep their bits.

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
                             batch_size, out_stride, num_bags, BUCKET_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_B: tl.constexpr, DIM_ALIGN: tl.constexpr, WINDOW: tl.constexpr):
    """``out[b, col:col+dim]`` = the pooled rows of the ``BLOCK_B`` bags from ``pid * BLOCK_B``
    (bag ``i`` is feature ``i // batch_size``'s sample ``i % batch_size``).

    values: ``[N]`` int32/int64 raw ids; offsets: ``[K*B+1]``; keys: ``[num_slots + 1]`` int64
    (``EMPTY`` = int64 min where free); weight: the flat fp32 storage; out: ``[B, out_stride]``
    fp32; meta: ``[K, HASH_FIELDS]`` int64; fallback: ``[K]`` int64 counts (added to);
    num_bags: ``K*B``; DIM_ALIGN: a power of two dividing every key's dim, weight offset and
    output column (the row loads and stores vectorise); WINDOW: the keys loaded per id, a power
    of two >= BUCKET_SIZE (those past the bucket masked off: the launcher takes at least 8,
    whose tiles compile to far fewer registers than a narrow bucket's).
    """
    bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = bags < num_bags
    feature = bags // batch_size
    sample = bags % batch_size
    # a block's lanes may belong to different features: every field is read per lane
    meta = meta_ptr + feature * HASH_FIELDS
    w_offset = tl.multiple_of(tl.load(meta + HASH_WEIGHT_OFFSET, mask=valid, other=0), DIM_ALIGN)
    dim = tl.multiple_of(tl.load(meta + HASH_DIM, mask=valid, other=0), DIM_ALIGN)
    out_column = tl.multiple_of(tl.load(meta + HASH_OUT_COLUMN, mask=valid, other=0), DIM_ALIGN)
    mean = tl.load(meta + HASH_MEAN, mask=valid, other=0) != 0
    hashed = tl.load(meta + HASH_HASHED, mask=valid, other=0) != 0
    bucket_base = tl.load(meta + HASH_BUCKET_BASE, mask=valid, other=0)
    num_buckets = tl.load(meta + HASH_NUM_BUCKETS, mask=valid, other=1)
    slot_base = tl.load(meta + HASH_SLOT_BASE, mask=valid, other=0)
    fallback_row = tl.load(meta + HASH_FALLBACK, mask=valid, other=0)
    start = tl.load(offsets_ptr + bags, mask=valid, other=0).to(tl.int64)
    length = tl.load(offsets_ptr + bags + 1, mask=valid, other=0).to(tl.int64) - start
    length = tl.where(valid & (dim > 0), length, 0)  # a key no table reads is neither probed nor counted
    probe = hashed & (dim > 0)
    max_len = tl.max(length, 0)
    slots = tl.arange(0, WINDOW)
    in_bucket = slots < BUCKET_SIZE
    cols = tl.arange(0, BLOCK_D)
    misses = tl.zeros([BLOCK_B], dtype=tl.int32)
    for d0 in range(0, tl.max(dim, 0), BLOCK_D):
        col_mask = (d0 + cols)[None, :] < dim[:, None]
        acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        # the pipeline starts empty: positions -1 to -3 hold no id (masks off, nothing loaded)
        raw1 = tl.zeros([BLOCK_B], dtype=values_ptr.dtype.element_ty)
        raw2 = tl.zeros([BLOCK_B], dtype=tl.int64)
        bucket2 = tl.zeros([BLOCK_B], dtype=tl.int64)
        window2 = tl.zeros([BLOCK_B, WINDOW], dtype=tl.int64)
        rows3 = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for q in range(0, max_len + 3):
            # position q - 3: its rows, loaded by the iteration before, added (zeros before position 0)
            acc += rows3
            # position q - 2: the slot that holds its id (or the fallback row), and its row
            live2 = (q >= 2) & (q - 2 < length)
            match = (window2 == raw2[:, None]) & (live2 & probe)[:, None] & in_bucket[None, :]
            found = tl.max(match.to(tl.int32), 1) > 0
            slot = tl.min(tl.where(match, slots[None, :], BUCKET_SIZE), 1)
            row = tl.where(found, bucket2 * BUCKET_SIZE + slot - slot_base, fallback_row)
            row = tl.where(hashed, row, raw2)
            misses += (probe & live2 & ~found & (d0 == 0)).to(tl.int32)
            row_start = tl.multiple_of(w_offset + row * dim, DIM_ALIGN)
            rows3 = tl.load(weight_ptr + row_start[:, None] + d0 + cols[None, :],
                            mask=live2[:, None] & col_mask, other=0.0).to(tl.float32)
            # position q - 1: its id's bucket and that bucket's keys
            live1 = (q >= 1) & (q - 1 < length)
            raw2 = raw1.to(tl.int64)
            h = _mix(raw2)
            # ops/hash_probe_torch.bucket_of's multiply-shift, ((h & 0xFFFFFFFF) * num_buckets) >> 32,
            # as the high word of a 32-bit product (num_buckets < 2^31)
            bucket2 = bucket_base + tl.umulhi(h.to(tl.uint32), num_buckets.to(tl.uint32)).to(tl.int64)
            window2 = tl.load(keys_ptr + bucket2[:, None] * BUCKET_SIZE + slots[None, :],
                              mask=(live1 & probe)[:, None] & in_bucket[None, :], other=0)
            # position q: its id
            raw1 = tl.load(values_ptr + start + q, mask=q < length, other=0)
        acc = tl.where(mean[:, None], acc / tl.maximum(length, 1).to(tl.float32)[:, None], acc)
        tl.store(out_ptr + (sample * out_stride + out_column)[:, None] + d0 + cols[None, :], acc,
                 mask=valid[:, None] & col_mask)
    # misses are rare (ids no bucket holds): only lanes that had one add to their feature's count
    tl.atomic_add(fallback_ptr + feature, misses.to(tl.int64), mask=valid & (misses > 0))
