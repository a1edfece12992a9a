"""The hash table's training step on torch ops: look ids up, count the missing ones for
admission, give admitted new ids slots (evicting by each table's policy) and stamp the slots
looked up, updating the state in place (the rules: ``hash_probe_torch.py``'s docstring; the
probes and hashes it uses are there too).

Fixed shapes by default (no ``.item()``, no data-dependent size), so that a compiled graph
holds the whole step; eager CPU callers may place only the positions that need it
(``train_step(compact=True)``), with the same result.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from jaggedrec.ops.hash_probe_torch import (
    EMPTY,
    TAG_BUCKET,
    bucket_view,
    hinted_probe,
    positions,
    probe,
)

NEVER = torch.iinfo(torch.int64).max  # the ranking score of a slot that cannot be taken
POLICY_NONE, POLICY_LRU, POLICY_LFU, POLICY_TTL = 0, 1, 2, 3
ALL_POLICIES = frozenset((POLICY_NONE, POLICY_LRU, POLICY_LFU, POLICY_TTL))
_COUNT_CAP = 1 << 30  # LFU scores pack count and step in one int64


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
    """``[N, S]`` scores of the slots of each id's bucket (the lowest is the best to take, ties
    to the lower offset: :func:`_nth` reads them) and ``[N]`` how many may be taken (the rules:
    ``hash_probe_torch``'s docstring). ``counts_kept`` False: ``count`` is all 0 (no table
    evicts by LFU), so LFU's score would be ``last_step`` itself and is not formed.
    ``policies``: the policies the tables use (None: any); ``policy`` and ``ttl`` (``[N]``) are
    read only where they matter, so may be None when ``policies`` is {LRU} or {LRU, LFU} and
    ``counts_kept`` is False (every slot evictable, one score)."""
    k, last = (bucket_view(state, bucket_size).index_select(0, buckets) for state in (keys, last_step))
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
        lfu = bucket_view(count, bucket_size).index_select(0, buckets).clamp(max=_COUNT_CAP) * (1 << 32) + last
        score = torch.where(policy.unsqueeze(1) == POLICY_LFU, lfu, last)
    score = score.masked_fill(blocked, NEVER).masked_fill_(k == EMPTY, EMPTY)
    return score, (score != NEVER).sum(1)


def _nth(score: torch.Tensor, rank: torch.Tensor, compact: bool) -> torch.Tensor:
    """``[N]`` offset of the ``rank``-th best slot of each row of ``score`` (``[N, S]``; ``rank``
    ``[N]`` in ``[0, S)``): the stable sort's order. ``compact`` (eager CPU): ``argmin`` (the first
    minimum, as the stable sort puts first) serves the rows of rank 0, nearly all of them when
    new ids are few a bucket, and only the others are sorted; fixed shapes sort every row."""
    if not compact:
        return torch.sort(score, dim=1, stable=True).indices.gather(1, rank.unsqueeze(1)).squeeze(1)
    offset = score.argmin(1)
    later = rank.nonzero().squeeze(1)
    if later.numel():
        order = torch.sort(score.index_select(0, later), dim=1, stable=True).indices
        offset.index_copy_(0, later, order.gather(1, rank.index_select(0, later).unsqueeze(1)).squeeze(1))
    return offset


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
            slots placed (``hash_probe_torch``'s docstring on tags).
    """
    n = ids.numel()
    scratch = keys.numel() - 1
    valid = hashed_mask & (ids != EMPTY)  # EMPTY is the free slots' key: never found nor placed
    if tags is not None and not (compact and bucket_size == TAG_BUCKET):
        raise ValueError(f"tags serve compact steps over buckets of {TAG_BUCKET} slots (bucket_size {bucket_size}, "
                         f"compact {compact})")
    rest = None  # (tags) the positions the full probe saw: every admitted one is among them
    if tags is None:
        found, slot = probe(keys, bucket_size, ids, buckets, valid)
    else:
        found, slot, rest = hinted_probe(keys, tags[0], ids, buckets, tags[1], valid)
    # the slots looked up now take this step first: the ranking reads "last_step == step" as
    # "looked up in this batch" (earlier steps are all smaller), which it never evicts; found
    # slots stay, the others read -1 until placed (positions of features not hashed are never
    # found nor admitted, so they stay -1)
    stamp = torch.where(found, slot, scratch)
    last_step.put_(stamp, step.expand(n))
    not_found = ~found
    slot = torch.where(found, slot, -1)
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
            tags[0].put_(torch.where(m_slot >= 0, m_slot, scratch), tags[1].index_select(0, pick).to(torch.uint8))
        slot.put_(pick, m_slot)
        evicted = (m_evicted >= 0).nonzero().squeeze(1)
        evicted_at = pick.index_select(0, evicted)
        evicted_slot = m_evicted.index_select(0, evicted)
        m_live = m_slot >= 0
        last_step.put_(torch.where(m_live, m_slot, scratch), step.expand(pick.numel()))
        live = found.put_(pick, m_live)  # = slot >= 0, from bools (the picked were not found; found is done)
    else:
        new_slot, evicted_slot = _place(keys, last_step, count, step, bucket_size, ids, buckets, admitted,
                                        table_policy[table] if reads_policy else None,
                                        table_ttl[table] if reads_policy else None, counts_lookups, policies)
        last_step.put_(torch.where(new_slot >= 0, new_slot, scratch), step.expand(n))
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
    score, available = _ranking(keys, last_step, count, s_buckets, bucket_size,
                                 None if policy is None else policy.index_select(0, perm),
                                 None if ttl is None else ttl.index_select(0, perm), step, counts_kept, policies)
    placed = first & (rank < available)
    target = _nth(score, rank.clamp(0, bucket_size - 1), admitted is None)
    target = torch.where(placed, target.add_(s_buckets * bucket_size), scratch)
    evicted = placed & (keys.index_select(0, target) != EMPTY)
    # every duplicate reads its first's slot: the firsts' slots by their number (seen - 1)
    by_number = torch.full((n + 1,), -1, dtype=torch.int64, device=ids.device)
    by_number.put_(torch.where(first, seen - 1, n), torch.where(placed, target, -1))
    s_slot = by_number.index_select(0, (seen - 1).clamp_(min=0))
    if s_admitted is not None:
        s_slot = torch.where(s_admitted, s_slot, -1)
    new_slot = torch.empty_like(s_slot).put_(perm, s_slot)
    evicted_slot = torch.empty_like(s_slot).put_(perm, torch.where(evicted, target, -1))
    # write the new ids; the scratch slot takes the writes of the others
    keys.put_(target, torch.where(placed, s_ids, EMPTY))
    if counts_kept:  # else every count is 0 already
        count.index_fill_(0, target, 0)
    return new_slot, evicted_slot
