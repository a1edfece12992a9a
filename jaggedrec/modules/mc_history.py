"""The eviction step of :class:`~jaggedrec.modules.mc_modules.MCHManagedCollisionModule` in
tensors of fixed shape: no ``torch.unique``, no boolean indexing, no host reads, so that it
traces into one graph. Where TorchRec compacts (unique ids, ids not yet live), these keep every
slot and carry a validity mask; invalid entries rank below every valid one, so the ids chosen and
the rows they get are TorchRec's.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from jaggedrec.modules.mc_eviction import MCHEvictionPolicy, ThresholdFilter

_INT64_MAX = torch.iinfo(torch.int64).max


class Coalesced(NamedTuple):
    """The distinct ids of the history, most frequent first (ties: smaller id first), each ``[H]``;
    entries past the distinct ids (or filtered out) have ``valid`` false."""
    ids: torch.Tensor
    counts: torch.Tensor
    last_access_iter: torch.Tensor
    valid: torch.Tensor


def coalesce_history(hist_ids: torch.Tensor, hist_iter: torch.Tensor, filled: torch.Tensor,
                     threshold_filter: Optional[ThresholdFilter]) -> Coalesced:
    """``[H]`` recorded ids and their batches, of which the first ``filled`` (``[1]``) are set."""
    h = hist_ids.numel()
    pos = torch.arange(h, device=hist_ids.device)
    in_use = pos < filled
    keys, order = torch.sort(torch.where(in_use, hist_ids, _INT64_MAX), stable=True)
    iters = hist_iter[order]
    used = pos < filled  # sorting put the padding last
    first = used & torch.cat([keys.new_ones(1, dtype=torch.bool), keys[1:] != keys[:-1]])
    group = torch.where(used, torch.cumsum(first.long(), 0) - 1, h)  # padding -> scratch slot h
    ids = torch.full((h + 1,), _INT64_MAX, dtype=torch.int64, device=keys.device).index_put_((group,), keys)
    counts = torch.zeros(h + 1, dtype=torch.int64, device=keys.device).index_add_(0, group, used.long())
    last = torch.zeros(h + 1, dtype=torch.int64, device=keys.device).scatter_reduce_(0, group, iters, "amax")
    ids, counts, last = ids[:h], counts[:h], last[:h]
    valid = counts > 0
    if threshold_filter is not None:
        mask, _ = threshold_filter(counts)
        valid = valid & mask
    rank = torch.argsort(torch.where(valid, counts, -1), descending=True, stable=True)
    return Coalesced(ids[rank], counts[rank], last[rank], valid[rank])


def _scatter_rows(dest: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dest`` with ``dest[rows[i]] = src[i]``, where ``rows[i] == len(dest)`` means skip."""
    ext = torch.cat([dest, dest.new_zeros(1)])
    return ext.index_put_((rows,), src)[:-1]


def select_replacements(policy: MCHEvictionPolicy, current_iter: torch.Tensor, state: Dict[str, torch.Tensor],
                        hist: Coalesced, zch_size: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The new ``[zch_size]`` state (``ids`` and the policy's metadata, not yet re-sorted) and the
    ``[zch_size]`` bool mask of slots whose id was replaced.

    Live ids seen again update their metadata (counts add up, last access moves on); the last
    slot is pinned (it is the fallback row); then live and new ids are ranked by the policy's
    score, a stable descending sort over ``[live..., new...]``, and the i-th new id in the top
    ``zch_size`` takes the slot of the i-th live id outside it."""
    sorted_ids = state["ids"]
    h = hist.ids.numel()
    at = torch.searchsorted(sorted_ids[:-1], hist.ids)
    seen = hist.valid & (sorted_ids[at] == hist.ids)
    new = hist.valid & ~seen
    hist_meta = {"counts": hist.counts, "last_access_iter": hist.last_access_iter}
    meta: Dict[str, torch.Tensor] = {}
    pin = torch.arange(zch_size, device=sorted_ids.device) == zch_size - 1
    seen_rows = torch.where(seen, at, zch_size)
    for name in state:
        if name == "ids":
            continue
        old = state[name]
        if name == "counts":
            updated = old.index_add(0, at, torch.where(seen, hist.counts, 0))
            meta[name] = torch.where(pin, _INT64_MAX, updated)
        else:
            updated = _scatter_rows(old, seen_rows, hist_meta[name])
            meta[name] = torch.where(pin, current_iter, updated)
    merged = {name: torch.cat([meta[name], hist_meta[name]]) for name in meta}
    scores = policy.eviction_scores(current_iter, merged)
    lowest = float("-inf") if scores.is_floating_point() else torch.iinfo(scores.dtype).min
    eligible = torch.cat([torch.ones(zch_size, dtype=torch.bool, device=scores.device), new])
    scores = torch.where(eligible, scores, torch.full_like(scores[:1], lowest))
    ranked = torch.argsort(scores, descending=True, stable=True)
    top, rest = ranked[:zch_size], ranked[zch_size:]
    takes = top >= zch_size  # a new id in the top
    loses = rest < zch_size  # a live slot outside it
    # pair them up by order of appearance: k-th newcomer <-> k-th loser
    new_by_k = torch.full((h + 1,), 0, dtype=torch.int64, device=scores.device)
    new_by_k = new_by_k.index_put_((torch.where(takes, torch.cumsum(takes.long(), 0) - 1, h),), top - zch_size)
    slot_by_k = torch.full((h + 1,), zch_size, dtype=torch.int64, device=scores.device)
    slot_by_k = slot_by_k.index_put_((torch.where(loses, torch.cumsum(loses.long(), 0) - 1, h),), rest)
    pairs = torch.arange(h, device=scores.device) < takes.sum()
    slots = torch.where(pairs, slot_by_k[:h], zch_size)
    src = new_by_k[:h]
    out = {"ids": _scatter_rows(sorted_ids, slots, hist.ids[src])}
    for name in meta:
        out[name] = _scatter_rows(meta[name], slots, hist_meta[name][src])
    evicted = _scatter_rows(torch.zeros(zch_size, dtype=torch.bool, device=scores.device), slots,
                            torch.ones(h, dtype=torch.bool, device=scores.device))
    return out, evicted
