"""How ids find slots in a ``HashZchManagedCollisionModule``: buckets, probe windows, the
rounds that settle new ids on free (or expired) slots, opt-in, and the id frequencies.

``ZchPlacement`` is a mixin of that module alone: its methods read the module's own state
(``_hash_zch_identities``, ``_hash_zch_metadata``, ``_hash_zch_runtime_meta``,
``_segment_starts``, ``_segment_sizes``, ``_evicted_mask``, and its options), and are kept here
so that the module's file holds its contract and this one the placement rules (see the module's
docstring for them).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from jaggedrec.modules.hash_mc_evictions import HashZchEvictionPolicyName
from jaggedrec.ops.hash_probe_torch import wrapping_mul
from jaggedrec.sparse.jagged_tensor import JaggedTensor

_INT64_MAX = torch.iinfo(torch.int64).max


def _mix(ids: torch.Tensor) -> torch.Tensor:
    """A 64-bit mix of int64 ids (splitmix64's steps; the multiplies wrap), non-negative."""
    # compiled, the multiplies go through wrapping_mul (the same bits): Inductor's CPU code would
    # multiply as C++ signed int64, whose overflow is undefined behaviour
    mul = wrapping_mul if torch.compiler.is_compiling() else torch.mul
    x = ids ^ (ids >> 31)
    x = mul(x, -7046029254386353131)
    x = x ^ (x >> 29)
    x = mul(x, -4658895280553007687)
    return (x ^ (x >> 32)) & 0x7FFFFFFFFFFFFFFF


def _first_match(rows: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """``[N]`` the row of each id's first matching slot in its ``[N, P]`` probe window (any row
    where none matches: the caller picks another there)."""
    return rows.gather(1, match.long().argmax(1, keepdim=True)).squeeze(1)


class ZchPlacement:
    """Placement of a batch's ids (a mixin of ``HashZchManagedCollisionModule``)."""

    def bucket_of(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 ids -> ``[N]`` bucket, as TorchRec assigns them."""
        if self._input_hash_size == 0:
            return torch.remainder(ids, self._buckets)
        return ids // self._id_block()

    def table_keys(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 ids -> the ``[N]`` keys the table holds for them: the ids themselves, or
        with ``inference_dispatch_div_train_world_size`` their part within their bucket (``id //
        buckets``, or ``id % block`` with ``input_hash_size``), as TorchRec's input mapper does."""
        if not self._dispatch_div:
            return ids
        if self._input_hash_size == 0:
            return torch.div(ids, self._buckets, rounding_mode="floor")
        return torch.remainder(ids, self._id_block())

    def _id_block(self) -> int:
        """With ``input_hash_size``: the ids of one bucket, a block of this many consecutive ids."""
        return -(-self._input_hash_size // self._buckets)

    def probe_rows(self, ids: torch.Tensor, bucket: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` keys (:meth:`table_keys`) and their ``[N]`` buckets (a shard is fed only ids of
        its own) -> (``[N, P]`` local rows in probe order, ``[N, P]`` bool: within the bucket)."""
        start, size = self._segment_starts[bucket], self._segment_sizes[bucket]
        home = torch.remainder(_mix(ids), size)
        steps = torch.arange(self._max_probe, device=ids.device)
        rows = start[:, None] + torch.remainder(home[:, None] + steps, size[:, None])
        return rows, steps < size[:, None]

    def _place(self, ids: torch.Tensor, bucket: torch.Tensor, jt: Optional[JaggedTensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` keys (:meth:`table_keys`) and their buckets -> (``[N]`` local rows, ``[N]`` bool:
        own slot); inserts when ``jt`` is given."""
        rows, in_window = self.probe_rows(ids, bucket)
        table = self._hash_zch_identities.view(-1)
        meta = self._hash_zch_metadata.view(-1)
        match = (table[rows] == ids[:, None]) & in_window
        hit = match.any(1)
        row = torch.where(hit, _first_match(rows, match), self._fallback_rows(ids, bucket, rows))
        if jt is None:
            return row, hit
        opted_out = torch.zeros_like(hit)
        if self._opt_in_reserved and 0 < self._opt_in_prob < 100:  # 100: every id is admitted
            draws = (torch.rand_like(ids, dtype=torch.float) * 100).to(torch.int32)
            opted_out = ~hit & (draws >= self._opt_in_prob)
        expiry, now = (None, 0) if self._eviction_module is None else self._eviction_module(jt)
        lru = self._eviction_policy_name == HashZchEvictionPolicyName.LRU_EVICTION
        scratch = self._zch_size
        # slots held by an id of this batch (found or placed now) are not free, expired or not
        fresh = torch.zeros(scratch + 1, dtype=torch.bool, device=ids.device)
        fresh.index_put_((torch.where(hit, row, scratch),), torch.ones_like(hit))
        for _ in range(self._max_probe):
            pending = ~hit & ~opted_out
            ident = table[rows]
            free = ident == -1
            if expiry is not None:
                free = free | (meta[rows] < now)
            free = free & in_window & ~fresh[rows]
            if lru:  # among free slots, the one accessed longest ago (never used: first)
                key = torch.where(free, torch.where(ident == -1, -1, meta[rows].long()), _INT64_MAX)
                pick = key.argmin(1, keepdim=True)
            else:
                pick = free.long().argmax(1, keepdim=True)
            choice = rows.gather(1, pick).squeeze(1)
            cand = pending & free.any(1)
            if not torch.compiler.is_compiling() and not bool(cand.any()):
                break  # eager: nothing left to settle (on CPU this read costs nothing)
            target = torch.where(cand, choice, scratch)
            best = torch.full((scratch + 1,), _INT64_MAX, dtype=torch.int64, device=ids.device)
            best = best.scatter_reduce(0, target, ids, "amin")
            won = cand & (best[choice] == ids)
            target = torch.where(won, choice, scratch)
            replaced = torch.cat([table != -1, table.new_zeros(1, dtype=torch.bool)])[target] & won
            mask = torch.cat([self._evicted_mask, self._evicted_mask.new_zeros(1)])
            mask.index_put_((torch.where(replaced, choice, scratch),), torch.ones_like(replaced))
            self._evicted_mask.copy_(mask[:-1])
            if self._hash_zch_runtime_meta is not None:  # a replaced id's metadata goes with it
                rm = self._hash_zch_runtime_meta.data
                ext = torch.cat([rm, rm.new_zeros(1, rm.shape[1])])
                ext.index_put_((torch.where(replaced, choice, scratch),), rm.new_zeros(ids.numel(), rm.shape[1]))
                rm.copy_(ext[:-1])
            new_table = torch.cat([table, table.new_zeros(1)]).index_put_((target,), ids)
            table.copy_(new_table[:-1])
            fresh.index_put_((target,), torch.ones_like(won))
            hit = hit | won
            row = torch.where(won, choice, row)
        if self._opt_in_prob < 100 and self._opt_in_reserved:  # an id admitted by one of its lookups: all
            match = (table[rows] == ids[:, None]) & in_window & opted_out[:, None]
            now_held = match.any(1)
            row = torch.where(now_held, _first_match(rows, match), row)
            hit, opted_out = hit | now_held, opted_out & ~now_held
        self._evicted = True
        if expiry is not None:  # every id seen, old or new, lives on from now
            meta_ext = torch.cat([meta, meta.new_zeros(1)])
            meta_ext.index_put_((torch.where(hit, row, scratch),), expiry)
            meta.copy_(meta_ext[:-1])
        if self._track_id_freq:  # each lookup of an id in its own slot
            counts = self._hash_zch_runtime_meta.data.view(-1)
            ext = torch.cat([counts, counts.new_zeros(1)]).index_add_(0, torch.where(hit, row, scratch),
                                                                       torch.ones_like(row))
            counts.copy_(ext[:-1])
        # ids not admitted read their reserved slot, by design: not unplaced
        return row, hit | opted_out

    def _fallback_rows(self, ids: torch.Tensor, bucket: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[N]`` the local row an id reads without a slot of its own: its home slot, or with
        opt-in one of its bucket's reserved slots (by its hash)."""
        if not self._opt_in_reserved:
            return rows[:, 0]
        first_reserved = self._segment_starts[bucket] + self._segment_sizes[bucket]  # sizes leave them out
        return first_reserved + torch.remainder(_mix(ids), self._opt_in_reserved)
