"""The hash table's torch path, finding ids: the fixed hashes (an id's bucket, admission
counter and tag, and the counter-based draw that re-initialises evicted rows), and the probes
that find where an id sits, on fixed shapes (no ``.item()``, no data-dependent size) so that a
compiled graph holds them. The training step that admits, places and evicts ids is
``hash_place_torch.py``.

Storage (built by ``jaggedrec.modules.hash_table``): every hashed table of a collection shares
one slot space of ``num_slots`` slots, ``bucket_size`` slots a bucket, a table's buckets
contiguous; slot ``num_slots`` is a scratch slot that masked writes land in and nothing reads.
Per slot: ``keys`` (the raw id, ``EMPTY`` when free), ``last_step`` (the training step that
last looked it up) and ``count`` (look-ups since the id took the slot; kept for LFU only).

The rules, which ``tests/test_hash_table_properties.py``'s simulator restates in plain Python:

- an id's bucket is ``(low 32 bits of mix(id)) * num_buckets >> 32`` of its table (a multiply
  and a shift: no division on the CPU or in the Triton probe), and its slot whichever slot of
  that bucket holds it;
- in training, a missing id is counted in its table's admission sketch (one counter per
  ``mix(id) >> 32 % sketch_width``: colliding ids share a counter, so an id can be admitted
  early, never late) and is admitted once the counter reaches the threshold;
- admitted new ids of a bucket are taken in ascending id order; the k-th takes the k-th slot
  of the bucket's ranking: free slots first (by index), then occupied slots the policy may
  evict, best victim first (LRU: oldest ``last_step``; LFU: smallest ``count``, then oldest;
  TTL: only slots idle more than ``ttl`` steps, oldest first), ties by index. Slots looked up
  in this batch are never evicted. An admitted id past the ranking's end is *unplaced*.

Eager CPU steps over buckets of 8 slots may also keep *tags* (``[num_slots + 1]`` uint8, one
byte of each slot's id hash, :func:`tag_of`): a bucket's tags are one int64 word, so the probe
reads one word and one key an id instead of the bucket's 8 keys. Tags are a hint only: a slot
they point at is checked against its key, and the ids they do not place go through the full
probe (which re-tags the slots it finds), so stale or wrong tags cost time, never a result.
"""

from __future__ import annotations

from typing import Optional

import torch

EMPTY = torch.iinfo(torch.int64).min  # a free slot's key; the id equal to it is never placed
_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64's multipliers, as int64


def mix(ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 -> ``[N]`` int64: splitmix64's finaliser of the id's 64 bits (the multiplies
    wrap; the shifts are logical, hence the masks), as a signed int64."""
    x = ids.to(torch.int64)
    if torch.compiler.is_compiling():  # the same bits, with no product that overflows (see wrapping_mul)
        x = wrapping_mul(x.bitwise_xor((x >> 30).bitwise_and_((1 << 34) - 1)), _M1)
        x = wrapping_mul(x.bitwise_xor((x >> 27).bitwise_and_((1 << 37) - 1)), _M2)
        return x.bitwise_xor((x >> 31).bitwise_and_((1 << 33) - 1))
    x = x.bitwise_xor((x >> 30).bitwise_and_((1 << 34) - 1)).mul_(_M1)  # a new tensor: then in place
    x.bitwise_xor_((x >> 27).bitwise_and_((1 << 37) - 1)).mul_(_M2)
    return x.bitwise_xor_((x >> 31).bitwise_and_((1 << 33) - 1))


_LOW32 = 0xFFFFFFFF


def wrapping_mul(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[N]`` int64 times the int64 constant ``m`` modulo 2^64 (``x * m``'s bits), from products
    of 32-bit by 16-bit halves that never overflow int64. For compiled graphs: Inductor's CPU
    code multiplies int64 as C++ signed integers, where an overflowing product is undefined
    behaviour, and GCC -O3 has acted on it (a per-row hash inside a [rows, dim] loop made a
    bounds check on valid indices fail, torch 2.13); the shifts left it emits are unsigned."""
    lo, hi = x & _LOW32, (x >> 32) & _LOW32  # x = hi * 2^32 + lo
    m_lo, m_hi = m & _LOW32, (m >> 32) & _LOW32
    low_product = lo * (m_lo & 0xFFFF)  # lo * m_lo = low_product + lo * (m_lo >> 16) * 2^16, each < 2^48
    high_product = lo * (m_lo >> 16)
    result_lo = (low_product + ((high_product & 0xFFFF) << 16)) & _LOW32
    carry = ((low_product >> 16) + high_product) >> 16  # bits 32..63 of lo * m_lo
    result_hi = (carry + _mul_low32(lo, m_hi) + _mul_low32(hi, m_lo)) & _LOW32
    return (result_hi << 32) | result_lo


def _mul_low32(a: torch.Tensor, b: int) -> torch.Tensor:
    """``(a * b) mod 2^32`` for ``a`` in ``[0, 2^32)`` and ``b`` a 32-bit constant, each partial
    product below 2^48."""
    return ((a * (b & 0xFFFF)) + (((a * (b >> 16)) & 0xFFFF) << 16)) & _LOW32


MAX_BUCKETS = 1 << 31  # a table's buckets: below this, the product below stays under 2^63


def bucket_of(hashed: torch.Tensor, bucket_base, num_buckets) -> torch.Tensor:
    """Global bucket of each id: ``bucket_base + ((hashed & 2^32-1) * num_buckets >> 32)``
    (``[N]`` tensors or ints each; ``num_buckets < MAX_BUCKETS``). The low 32 bits scaled to
    ``[0, num_buckets)``: uniform as a remainder would be, without a 64-bit division, and
    independent of the sketch's and the tag's bits (the high 32 and the top 8)."""
    return (hashed & _LOW32).mul_(num_buckets).bitwise_right_shift_(32).add_(bucket_base)


def sketch_of(hashed: torch.Tensor, sketch_base: torch.Tensor, sketch_width: torch.Tensor) -> torch.Tensor:
    """Global admission counter of each id: ``sketch_base + ((hashed >> 32) & 2^32-1) % width``."""
    return sketch_base + ((hashed >> 32) & 0xFFFFFFFF) % sketch_width


_GOLDEN32 = -1640531527  # 0x9E3779B9 (the golden ratio's 32 bits), as int32: columns' stride
_LB1, _LB2 = 0x7FEB352D, -2073254261  # lowbias32's multipliers (the second 0x846CA68B as int32)


def fresh_uniform(seed: int, step: torch.Tensor, table: torch.Tensor, row: torch.Tensor, dim: int) -> torch.Tensor:
    """``[P, dim]`` float32 in ``[0, 1)`` (24 random bits each): the draw for re-initialising
    row ``row`` of hashed table ``table`` at training step ``step``, counter-based: element
    ``[p, c]`` is a hash of ``(seed, step, table[p], row[p], c)`` only. So it needs no generator
    state and no host sync, is the same in eager, compacted and compiled steps and on any
    device, and an eviction's values do not depend on which other rows were evicted with it.

    Args:
        seed: the collection's seed (any int below 2^62).
        step: ``[1]`` int64, the step of the batch that evicted.
        table, row: ``[P]`` int64, hashed table index and row (any value; -1 rows are drawn too).
        dim: columns to draw (column ``c``'s value does not depend on ``dim``).
    """
    # [P] 64 bits a (seed, step, table, row): (table, row) packed (rows below 2^40) and mixed
    # with the step's key; splitmix64's finaliser is a bijection, so distinct rows get distinct keys
    key = mix(((table << 40) + row) ^ mix(step + seed))
    low = ((key << 32) >> 32).to(torch.int32)  # sign-extended low half: exact in int32
    high = (key >> 32).to(torch.int32)
    column = torch.arange(dim, dtype=torch.int32, device=row.device).mul_(_GOLDEN32)
    # lowbias32 (an integer hash of good avalanche) of each element's counter, in place;
    # int32 multiplies wrap, and the masks make the arithmetic shifts logical
    x = (low.unsqueeze(1) + column).bitwise_xor_(high.unsqueeze(1))
    x.bitwise_xor_((x >> 16) & 0xFFFF).mul_(_LB1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF).mul_(_LB2)
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    return ((x >> 8) & 0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24))


TAG_BUCKET = 8  # tags serve buckets of this many slots: one bucket's tags are one int64 word
_ONES = 0x0101010101010101  # 1 in every byte
_HIGHS = -0x7F7F7F7F7F7F7F80  # 0x80 in every byte, as int64
_BYTE_MAGIC = sum((7 - m) << (8 * m) for m in range(8))  # see _byte_index


def tag_of(hashed: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 (:func:`mix` of the ids) -> ``[N]`` int64 in ``[0, 256)``: the slot's tag
    (the top byte of the hash; the bucket comes from its low 32 bits)."""
    return (hashed >> 56).bitwise_and_(0xFF)


def tags_of_keys(keys: torch.Tensor) -> torch.Tensor:
    """``[num_slots + 1]`` int64 keys -> uint8 tags, 0 at free slots (any value would do)."""
    return torch.where(keys == EMPTY, 0, tag_of(mix(keys))).to(torch.uint8)


def _tag_probe(keys, tags, ids, buckets, tag, valid):
    """Where the tags place each id (buckets of :data:`TAG_BUCKET` slots): ``(found [N] bool,
    slot [N] int64)``, found only where the key at the bucket's lowest slot of the id's tag is
    the id. An id it does not find may still sit in its bucket (a stale tag, or a lower slot
    of the same tag): the caller probes those in full."""
    words = tags.narrow(0, 0, tags.numel() - 1).view(torch.int64)  # [num_buckets]: a bucket's tags
    x = words.index_select(0, buckets).bitwise_xor_(tag * _ONES)  # bytes of the id's tag -> 0
    # a zero byte's flag (0x80): (x - 1s) & ~x & 0x80s; the lowest flag is exact (a borrow can
    # only flag bytes above a zero one), and it is the one kept
    flags = x - _ONES
    flags.bitwise_and_(x.bitwise_not_()).bitwise_and_(_HIGHS)
    flags.bitwise_and_(flags.neg())
    # its byte index, as _byte_index finds it (0 where no byte matched: checked like any other)
    offset = flags.bitwise_right_shift_(7).bitwise_and_(_ONES).mul_(_BYTE_MAGIC).bitwise_right_shift_(56)
    slot = offset.add_(buckets, alpha=TAG_BUCKET)
    return (keys.index_select(0, slot) == ids) & valid, slot


def hinted_probe(keys, tags, ids, buckets, tag, valid):
    """:func:`probe` with the tags' hint (eager): the tag probe, then the full probe of the
    valid ids it did not find (``rest``, ``[R]`` ascending positions, returned third), whose
    found slots take the ids' tags."""
    found, slot = _tag_probe(keys, tags, ids, buckets, tag, valid)
    rest = positions(ids.numel(), ids.device).masked_select(valid & ~found)
    r_found, r_slot = probe(keys, TAG_BUCKET, ids.index_select(0, rest), buckets.index_select(0, rest),
                             torch.ones_like(rest, dtype=torch.bool))
    found.put_(rest, r_found)
    slot.put_(rest, r_slot)
    scratch = keys.numel() - 1
    tags.put_(torch.where(r_found, r_slot, scratch), tag.index_select(0, rest).to(torch.uint8))
    return found, slot, rest


_POSITIONS = {}  # device -> the longest arange made for it (eager use only)


def positions(n: int, device) -> torch.Tensor:
    """``arange(n)`` int64, narrowed from one kept arange per device (eager: the compact picks
    ``masked_select`` from it, which costs less than ``nonzero`` on CPU; not for graphs)."""
    kept = _POSITIONS.get(str(device))
    if kept is None or kept.numel() < n:
        kept = _POSITIONS[str(device)] = torch.arange(max(n, 1024), device=device)
    return kept.narrow(0, 0, n)


def probe(keys: torch.Tensor, bucket_size: int, ids: torch.Tensor, buckets: torch.Tensor,
          valid: Optional[torch.Tensor] = None):
    """Where each id sits: ``(found [N] bool, slot [N] int64)`` (the global slot; meaningless
    where not found). ``keys``: ``[num_slots + 1]``; ``ids``, ``buckets``: ``[N]`` int64;
    ``valid``: ``[N]`` bool, found only there (None: every id but ``EMPTY``, the free slots'
    key, which a given ``valid`` must leave out too)."""
    if valid is None:
        valid = ids != EMPTY
    if torch.compiler.is_compiling() and bucket_size <= 16:
        # one gather and compare per slot, unrolled: elementwise ops that Inductor fuses into one
        # pass over the ids, where the [N, S] compare's any and argmax compiled to a slow loop
        base = buckets * bucket_size
        found = torch.zeros_like(valid)
        offset = torch.zeros_like(buckets)
        for c in range(bucket_size):
            at = keys.index_select(0, base + c) == ids
            found = found | at
            offset = torch.where(at, c, offset)  # the one slot an id sits in (where found)
        return found & valid, offset.add_(base)
    match = bucket_view(keys, bucket_size).index_select(0, buckets) == ids.unsqueeze(1)  # [N, S]
    packed = _packed(match)
    if packed is None:
        found, offset = match.any(1), match.to(torch.int8).argmax(1)
    else:  # an id sits in at most one slot of its bucket: one byte of the word is 1
        found, offset = packed != 0, _byte_index(packed, bucket_size)
    return found & valid, offset.add_(buckets * bucket_size)


_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bucket_view(state: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """``[num_buckets, S]`` view of a ``[num_slots + 1]`` slot array (the scratch slot left out)."""
    return state.narrow(0, 0, state.numel() - 1).view(-1, bucket_size)


def _packed(match: torch.Tensor):
    """``[N, S]`` bool -> ``[N]`` int64, the S flags as the bytes of one word (eager, S of 1, 2, 4
    or 8: one pass instead of ``any`` and ``argmax``), or None where that does not apply (other
    sizes; traced graphs keep the plain ops)."""
    word = _WORDS.get(match.shape[1])
    if word is None or torch.compiler.is_compiling() or not match.is_contiguous():
        return None
    return match.view(torch.uint8).view(word).squeeze(1).to(torch.int64)


def _byte_index(packed: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """``[N]`` int64: which byte of ``packed`` is 1 (at most one is; 0 where none). Multiplying by
    the bytes ``S-1, ..., 1, 0`` (low to high) puts the index in byte ``S-1``: no carries, every
    partial sum is below 256."""
    if bucket_size == 1:
        return torch.zeros_like(packed)
    magic = sum((bucket_size - 1 - m) << (8 * m) for m in range(bucket_size))
    index = (packed * magic) >> (8 * (bucket_size - 1))
    # at 8 slots byte 7 is the top byte (index < 8: no sign bits to clear); else mask the bytes above
    return index if bucket_size == 8 else index.bitwise_and_(0xFF)


def lookup(keys: torch.Tensor, bucket_size: int, ids, buckets, hashed_mask) -> torch.Tensor:
    """Eval: ``[N]`` int64 slot of each id, ``-1`` where it is absent or not hashed."""
    found, slot = probe(keys, bucket_size, ids, buckets)
    return torch.where(found & hashed_mask, slot, -1)
