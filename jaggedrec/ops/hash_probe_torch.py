"""The hash table's torch path: hashing, probing and the training step that admits, places and
evicts ids, on fixed shapes (no ``.item()``, no data-dependent size), so that a compiled graph
holds the whole step; eager CPU callers may place only the positions that need it
(``train_step(compact=True)``), with the same result.

Storage (built by ``jaggedrec.modules.hash_table``): every hashed table of a collection shares
one slot space of ``num_slots`` slots, ``bucket_size`` slots a bucket, a table's buckets
contiguous; slot ``num_slots`` is a scratch slot that masked writes land in and nothing reads.
Per slot: ``keys`` (the raw id, ``EMPTY`` when free), ``last_step`` (the training step that
last looked it up) and ``count`` (look-ups since the id took the slot; kept for LFU only).

The rules, which ``tests/test_hash_table_properties.py``'s simulator restates in plain Python:

- an id's bucket is ``mix(id) % num_buckets`` of its table, and its slot whichever slot of
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

from typing import NamedTuple, Optional

import torch

EMPTY = torch.iinfo(torch.int64).min  # a free slot's key; the id equal to it is never placed
NEVER = torch.iinfo(torch.int64).max  # the ranking score of a slot that cannot be taken
POLICY_NONE, POLICY_LRU, POLICY_LFU, POLICY_TTL = 0, 1, 2, 3
ALL_POLICIES = frozenset((POLICY_NONE, POLICY_LRU, POLICY_LFU, POLICY_TTL))
_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64's multipliers, as int64
_LOW63 = 0x7FFFFFFFFFFFFFFF
_COUNT_CAP = 1 << 30  # LFU scores pack count and step in one int64


def mix(ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 -> ``[N]`` int64: splitmix64's finaliser of the id's 64 bits (the multiplies
    wrap; the shifts are logical, hence the masks), as a signed int64."""
    x = ids.to(torch.int64)
    x = x.bitwise_xor((x >> 30).bitwise_and_((1 << 34) - 1)).mul_(_M1)  # a new tensor: then in place
    x.bitwise_xor_((x >> 27).bitwise_and_((1 << 37) - 1)).mul_(_M2)
    return x.bitwise_xor_((x >> 31).bitwise_and_((1 << 33) - 1))


def bucket_of(hashed: torch.Tensor, bucket_base, num_buckets) -> torch.Tensor:
    """Global bucket of each id: ``bucket_base + (hashed & 2^63-1) % num_buckets`` (``[N]``
    tensors or ints each)."""
    return (hashed & _LOW63).remainder_(num_buckets).add_(bucket_base)


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
    (the top byte of the hash; the bucket is the remainder of all 63 low bits)."""
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


def _hinted_probe(keys, tags, ids, buckets, tag, valid):
    """:func:`_probe` with the tags' hint (eager): the tag probe, then the full probe of the
    valid ids it did not find (``rest``, ``[R]`` ascending positions, returned third), whose
    found slots take the ids' tags."""
    found, slot = _tag_probe(keys, tags, ids, buckets, tag, valid)
    rest = positions(ids.numel(), ids.device).masked_select(valid & ~found)
    r_found, r_slot = _probe(keys, TAG_BUCKET, ids.index_select(0, rest), buckets.index_select(0, rest),
                             torch.ones_like(rest, dtype=torch.bool))
    found.index_copy_(0, rest, r_found)
    slot.index_copy_(0, rest, r_slot)
    scratch = keys.numel() - 1
    tags.index_copy_(0, torch.where(r_found, r_slot, scratch), tag.index_select(0, rest).to(torch.uint8))
    return found, slot, rest


_POSITIONS = {}  # device -> the longest arange made for it (eager use only)


def positions(n: int, device) -> torch.Tensor:
    """``arange(n)`` int64, narrowed from one kept arange per device (eager: the compact picks
    ``masked_select`` from it, which costs less than ``nonzero`` on CPU; not for graphs)."""
    kept = _POSITIONS.get(str(device))
    if kept is None or kept.numel() < n:
        kept = _POSITIONS[str(device)] = torch.arange(max(n, 1024), device=device)
    return kept.narrow(0, 0, n)


def probe(keys: torch.Tensor, bucket_size: int, ids: torch.Tensor, buckets: torch.Tensor):
    """Where each id sits: ``(found [N] bool, slot [N] int64)`` (the global slot; meaningless
    where not found). ``keys``: ``[num_slots + 1]``; ``ids``, ``buckets``: ``[N]`` int64."""
    return _probe(keys, bucket_size, ids, buckets, ids != EMPTY)


def _probe(keys, bucket_size: int, ids, buckets, valid):
    """:func:`probe` where ``valid`` (``[N]`` bool): found only there (an id equal to EMPTY, the
    free slots' key, must be invalid)."""
    match = _bucket_view(keys, bucket_size).index_select(0, buckets) == ids.unsqueeze(1)  # [N, S]
    packed = _packed(match)
    if packed is None:
        found, offset = match.any(1), match.to(torch.int8).argmax(1)
    else:  # an id sits in at most one slot of its bucket: one byte of the word is 1
        found, offset = packed != 0, _byte_index(packed, bucket_size)
    return found & valid, offset.add_(buckets * bucket_size)


_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bucket_view(state: torch.Tensor, bucket_size: int) -> torch.Tensor:
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


class Placement(NamedTuple):
    """What :func:`train_step` did, per position: the slot each id reads (``-1``: none) and the
    slot an evicted id left to it (``-1``: no eviction there; set at the first position of
    each placed id only)."""

    slot: torch.Tensor  # [N] int64
    evicted_slot: torch.Tensor  # [N] int64 ([E] in compact steps: see evicted_at)
    unplaced: torch.Tensor  # [N] bool: admitted, but no slot could be had
    pending: torch.Tensor  # [N] bool: missing and not admitted (yet)
    # [E] int64 positions whose id evicted another (compact steps, where ``evicted_slot`` is
    # ``[E]`` too, the slot each of them left; None on fixed shapes)
    evicted_at: Optional[torch.Tensor] = None
    live: Optional[torch.Tensor] = None  # [N] bool: slot >= 0


def _ranking(keys, last_step, count, buckets, bucket_size: int, policy, ttl, step, counts_kept: bool = True,
             policies=None):
    """``[N, S]`` offsets (``0 .. S-1``) of the slots of each id's bucket, best to take first, and
    ``[N]`` how many may be taken (see the module's rules). ``counts_kept`` False: ``count`` is
    all 0 (no table evicts by LFU), so LFU's score would be ``last_step`` itself and is not
    formed. ``policies``: the policies the tables use (None: any); ``policy`` and ``ttl``
    (``[N]``) are read only where they matter, so may be None when ``policies`` is {LRU} or
    {LRU, LFU} and ``counts_kept`` is False (every slot evictable, one score)."""
    k, last = (_bucket_view(state, bucket_size).index_select(0, buckets) for state in (keys, last_step))
    policies = ALL_POLICIES if policies is None else frozenset(policies)
    blocked = last == step  # looked up in this batch (train_step wrote those first): never evicted
    if not policies <= {POLICY_LRU, POLICY_LFU}:  # some slots are not evictable at all
        table_policy = policy.unsqueeze(1)
        evictable = (table_policy == POLICY_LRU) | (table_policy == POLICY_LFU)
        if POLICY_TTL in policies:
            evictable = evictable | (table_policy == POLICY_TTL) & (step - last > ttl.unsqueeze(1))
        blocked |= ~evictable
    score = last
    if counts_kept:
        lfu = _bucket_view(count, bucket_size).index_select(0, buckets).clamp(max=_COUNT_CAP) * (1 << 32) + last
        score = torch.where(policy.unsqueeze(1) == POLICY_LFU, lfu, last)
    score = score.masked_fill(blocked, NEVER).masked_fill_(k == EMPTY, EMPTY)
    score, order = torch.sort(score, dim=1, stable=True)
    return order, (score != NEVER).sum(1)


def _reads_policy(policies, counts_kept: bool) -> bool:
    """Whether :func:`_ranking` reads the per-position policy (see there)."""
    return counts_kept or policies is None or not frozenset(policies) <= {POLICY_LRU, POLICY_LFU}


def train_step(keys, last_step, count, sketch, step, bucket_size: int, ids, buckets, hashed_mask, table,
               table_policy, table_ttl, admission=None, compact: bool = False,
               counts_lookups: bool = True, policies=None, tags=None) -> Placement:
    """One training batch: look ids up, admit, place and evict, updating the state in place.

    Args:
        keys, last_step, count: ``[num_slots + 1]`` int64 slot state (updated).
        sketch: ``[W + 1]`` int64 admission counters (updated; the last is scratch).
        step: ``[1]`` int64, this batch's step (already advanced).
        ids, buckets: ``[N]`` int64 raw ids and global buckets (valid buckets everywhere, also
            where ``hashed_mask`` is False).
        hashed_mask: ``[N]`` bool, the positions of hashed tables (the others are left alone).
        table: ``[N]`` int64 hashed table of each position; table_policy, table_ttl: ``[H + 1]``.
        admission: None when every threshold is 1, else ``(sketch_index, threshold)``, ``[N]``
            int64 each: the position's counter and its table's threshold.
        counts_lookups: keep ``count`` (False: no table evicts by LFU, ``count`` stays 0).
        compact: place only the admitted positions, picked with ``nonzero`` (a data-dependent
            size: for eager CPU tensors, where it waits on no device); else every position
            goes through the placement, masked (fixed shapes: compiled graphs, GPUs).
        policies: the eviction policies the tables use (a set of ``POLICY_*``, known when the
            state is built; None: any), so that the placement forms only their scores.
        tags: None, or ``([num_slots + 1] uint8 tags, [N] int64 tag of each id)`` (compact
            steps over buckets of :data:`TAG_BUCKET` slots): probe through them, and tag the
            slots placed (the module's rules above).
    """
    n = ids.numel()
    scratch = keys.numel() - 1
    valid = hashed_mask & (ids != EMPTY)  # EMPTY is the free slots' key: never found nor placed
    if tags is not None and not (compact and bucket_size == TAG_BUCKET):
        raise ValueError(f"tags serve compact steps over buckets of {TAG_BUCKET} slots (bucket_size {bucket_size}, "
                         f"compact {compact})")
    rest = None  # (tags) the positions the full probe saw: every admitted one is among them
    if tags is None:
        found, slot = _probe(keys, bucket_size, ids, buckets, valid)
    else:
        found, slot, rest = _hinted_probe(keys, tags[0], ids, buckets, tags[1], valid)
    # the slots looked up now take this step first: the ranking reads "last_step == step" as
    # "looked up in this batch" (earlier steps are all smaller), which it never evicts; found
    # slots stay, the others read -1 until placed (positions of features not hashed are never
    # found nor admitted, so they stay -1)
    stamp = torch.where(found, slot, scratch)
    last_step.index_copy_(0, stamp, step.expand(n))
    not_found = ~found
    slot = stamp.masked_fill_(not_found, -1)
    miss = hashed_mask & not_found
    admitted = valid & not_found
    if admission is not None:  # occurrences of missing ids in their table's counters
        sketch_index, threshold = admission
        counted = miss & (threshold > 1)
        sketch.index_add_(0, torch.where(counted, sketch_index, sketch.numel() - 1), counted.to(torch.int64))
        admitted = admitted & ((threshold <= 1) | (sketch.index_select(0, sketch_index) >= threshold))
    reads_policy = _reads_policy(policies, counts_lookups)
    evicted_at = None
    if compact:
        if rest is None:
            pick = positions(n, ids.device).masked_select(admitted)
        else:  # the same positions, picked from the fewer the full probe saw
            pick = rest.masked_select(admitted.index_select(0, rest))
        picked = table.index_select(0, pick) if reads_policy else None
        m_slot, m_evicted = _place(keys, last_step, count, step, bucket_size, ids.index_select(0, pick),
                                   buckets.index_select(0, pick), None,
                                   None if picked is None else table_policy.index_select(0, picked),
                                   None if picked is None else table_ttl.index_select(0, picked),
                                   counts_lookups, policies)
        if tags is not None:  # the new ids' tags (a duplicate writes its first's slot again)
            tags[0].index_copy_(0, torch.where(m_slot >= 0, m_slot, scratch),
                                tags[1].index_select(0, pick).to(torch.uint8))
        slot.index_copy_(0, pick, m_slot)
        evicted = (m_evicted >= 0).nonzero().squeeze(1)
        evicted_at = pick.index_select(0, evicted)
        evicted_slot = m_evicted.index_select(0, evicted)
        m_live = m_slot >= 0
        last_step.index_copy_(0, torch.where(m_live, m_slot, scratch), step.expand(pick.numel()))
        live = found.index_copy(0, pick, m_live)  # = slot >= 0, from bools (the picked were not found)
    else:
        new_slot, evicted_slot = _place(keys, last_step, count, step, bucket_size, ids, buckets, admitted,
                                        table_policy[table] if reads_policy else None,
                                        table_ttl[table] if reads_policy else None, counts_lookups, policies)
        last_step.index_copy_(0, torch.where(new_slot >= 0, new_slot, scratch), step.expand(n))
        slot = torch.where(found, slot, new_slot)
        live = slot >= 0
    if counts_lookups:  # LFU's score (the other policies never read it)
        count.index_add_(0, torch.where(live, slot, scratch), live.to(torch.int64))
    keys[scratch] = EMPTY
    return Placement(slot, evicted_slot, admitted & ~live, miss & ~admitted, evicted_at, live)


def _place(keys, last_step, count, step, bucket_size: int, ids, buckets, admitted, policy, ttl,
           counts_kept: bool = True, policies=None):
    """Give the admitted ids slots: ``[M]`` slot of each position (``-1``: none) and the slot an
    evicted id left (``-1``: none; at each new id's first position). Writes the new ids' keys
    and zeroes their counts. ``admitted`` None: every position is admitted (compact steps).
    ``policy``, ``ttl``: ``[M]`` per position, or None where :func:`_reads_policy` says so."""
    n = ids.numel()
    scratch = keys.numel() - 1
    # distinct admitted ids, by (bucket, id): two stable sorts; the others sort last
    by_id = torch.sort(ids, stable=True).indices
    sort_key = buckets if admitted is None else torch.where(admitted, buckets, NEVER)
    order_key, by_bucket = torch.sort(sort_key.index_select(0, by_id), stable=True)
    perm = by_id.index_select(0, by_bucket)
    s_ids = ids.index_select(0, perm)
    s_buckets = order_key if admitted is None else buckets.index_select(0, perm)
    same_id = (s_ids[1:] == s_ids[:-1]) & (s_buckets[1:] == s_buckets[:-1])
    first = torch.cat([same_id.new_zeros(1), same_id]).narrow(0, 0, n).logical_not_()
    s_admitted = None
    if admitted is not None:
        s_admitted = admitted.index_select(0, perm)
        first &= s_admitted
    # rank of each new id in its bucket: the firsts before it, less those before its bucket's run
    first_count = first.to(torch.int64)
    seen = torch.cumsum(first_count, 0)
    run_begin = torch.searchsorted(order_key, order_key)
    rank = seen - 1 - (seen - first_count).index_select(0, run_begin)
    ranked, available = _ranking(keys, last_step, count, s_buckets, bucket_size,
                                 None if policy is None else policy.index_select(0, perm),
                                 None if ttl is None else ttl.index_select(0, perm), step, counts_kept, policies)
    placed = first & (rank < available)
    target = ranked.gather(1, rank.clamp(0, bucket_size - 1).unsqueeze(1)).squeeze(1)
    target = torch.where(placed, target.add_(s_buckets * bucket_size), scratch)
    evicted = placed & (keys.index_select(0, target) != EMPTY)
    # every duplicate reads its first's slot: the firsts' slots by their number (seen - 1)
    by_number = torch.full((n + 1,), -1, dtype=torch.int64, device=ids.device)
    by_number.index_copy_(0, torch.where(first, seen - 1, n), torch.where(placed, target, -1))
    s_slot = by_number.index_select(0, (seen - 1).clamp_(min=0))
    if s_admitted is not None:
        s_slot = torch.where(s_admitted, s_slot, -1)
    new_slot = torch.empty_like(s_slot).index_copy_(0, perm, s_slot)
    evicted_slot = torch.empty_like(s_slot).index_copy_(0, perm, torch.where(evicted, target, -1))
    # write the new ids; the scratch slot takes the writes of the others
    keys.index_copy_(0, target, torch.where(placed, s_ids, EMPTY))
    if counts_kept:  # else every count is 0 already
        count.index_fill_(0, target, 0)
    return new_slot, evicted_slot


def lookup(keys: torch.Tensor, bucket_size: int, ids, buckets, hashed_mask) -> torch.Tensor:
    """Eval: ``[N]`` int64 slot of each id, ``-1`` where it is absent or not hashed."""
    found, slot = probe(keys, bucket_size, ids, buckets)
    return torch.where(found & hashed_mask, slot, -1)
