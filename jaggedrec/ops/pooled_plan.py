"""The torch path's plan: features grouped into *passes*, and what a pass reads of a batch.

The torch path serves the features that share an embedding dim with one call over the whole
flat weight block of that dim (their tables, one after another in storage order): each id is
shifted by its table's first row in the block, and the KJT's key-major offsets are used as
they are, so one call covers every key. A key used by two tables of the same dim (a shared
feature) needs a second call, so the features of one dim are split into passes in which each
key appears at most once. The pooled op's forward, backward and fused step, and the sequence
op, all walk the same passes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from jaggedrec.ops import backends
from jaggedrec.sparse.jagged_tensor import repeat_counts

POOLING_SUM, POOLING_MEAN = 0, 1

# With at least this many ids per key on average, the eager id shift adds each key's table
# base in a call of its own; with fewer, the ~6 us each of those calls cost more than one
# repeat_interleave over all ids (2-core EPYC: 10 keys of 2.5k ids 121 vs 68 us, 26 of 4k
# 314 vs 243 us, 26 of 80k 1.5 vs 4.6 ms). Up to _PER_KEY_ADD_MAX_KEYS keys the adds win at any
# size: the shift's own ops cost ~25 us (the tutorial's 2 keys of 3k ids: ~45 vs ~12 us).
_PER_KEY_ADD_MIN_IDS = 8192
_PER_KEY_ADD_MAX_KEYS = 4


@dataclass(frozen=True)
class Pass:
    """Features of one dim served by one ``embedding_bag`` call (each key at most once)."""

    dim: int
    weight_start: int          # element offset of the block in the flat weights
    num_rows: int              # rows of the [num_rows, dim] block view
    features: Tuple[int, ...]  # feature indices, ascending
    keys: Tuple[int, ...]      # KJT key of each feature
    key_row_base: Tuple[int, ...]  # [K] first row of the key's table in the block, -1 if unused
    mean: Tuple[bool, ...]     # MEAN pooling of each feature

    @property
    def covers_all_keys(self) -> bool:
        return min(self.key_row_base) >= 0


@dataclass(frozen=True)
class PooledPlan:
    passes: Tuple[Pass, ...]
    out_offsets: Tuple[int, ...]  # [F+1] output column of each feature
    feature_rows: Tuple[int, ...]  # [F] rows of each feature's table
    # largest power of two (at most 16) dividing every dim and table offset, hence every output
    # column: the kernels promise it to the compiler, which then moves rows in 16-byte vectors
    alignment: int


@functools.lru_cache(maxsize=256)
def make_plan(weight_offsets: Tuple[int, ...], rows: Tuple[int, ...], dims: Tuple[int, ...],
              keys: Tuple[int, ...], pooling: Tuple[int, ...], num_keys: int) -> PooledPlan:
    """Group features by dim, then into passes where each KJT key appears once."""
    num_features = len(dims)
    out_offsets = [0]
    for d in dims:
        out_offsets.append(out_offsets[-1] + d)
    passes: List[Pass] = []
    for dim in sorted(set(dims)):
        members = [f for f in range(num_features) if dims[f] == dim]
        start = min(weight_offsets[f] for f in members)
        end = max(weight_offsets[f] + rows[f] * dim for f in members)
        for f in members:
            if (weight_offsets[f] - start) % dim:
                raise ValueError(f"feature {f}: table offset {weight_offsets[f]} is not row-aligned "
                                 f"within the dim-{dim} block starting at {start}")
        pending = members
        while pending:
            taken, seen, rest = [], set(), []
            for f in pending:
                (rest if keys[f] in seen else taken).append(f)
                seen.add(keys[f])
            base = [-1] * num_keys
            for f in taken:
                base[keys[f]] = (weight_offsets[f] - start) // dim
            passes.append(Pass(dim, start, (end - start) // dim, tuple(taken),
                               tuple(keys[f] for f in taken), tuple(base),
                               tuple(pooling[f] == POOLING_MEAN for f in taken)))
            pending = rest
    alignment = 16
    while any(x % alignment for x in (*dims, *weight_offsets)):
        alignment //= 2
    return PooledPlan(tuple(passes), tuple(out_offsets), tuple(rows), alignment)


def block_view(flat: torch.Tensor, p: Pass) -> torch.Tensor:
    """The pass's block, ``[num_rows, dim]``: the rows of its dim's tables in ``flat`` (the flat
    weights, or anything laid out as they are: a gradient, Adam's moments)."""
    if p.weight_start == 0 and flat.shape[0] == p.num_rows * p.dim:  # the whole tensor: one call fewer
        return flat.view(p.num_rows, p.dim)
    return flat.narrow(0, p.weight_start, p.num_rows * p.dim).view(p.num_rows, p.dim)


def shifted_ids(p: Pass, values: torch.Tensor,
                key_counts: Union[torch.Tensor, List[int]]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``[N]`` row of each id in the pass's block, and ``[N]`` bool "id belongs to the pass".

    Ids of keys outside the pass point at row 0 (their bags are dropped); the mask is None
    when the pass covers every key. ``key_counts``: ``[K]`` ids per key, a tensor or (eager
    CPU, see :func:`host_key_counts`) host ints.
    """
    # (host readable first: compiled, the id count is unbacked and cannot be compared)
    num_keys = len(p.key_row_base)
    on_host = isinstance(key_counts, list)
    if p.covers_all_keys and (on_host or backends.host_readable(values, key_counts)) and (
            num_keys <= _PER_KEY_ADD_MAX_KEYS or values.shape[0] >= _PER_KEY_ADD_MIN_IDS * num_keys):
        # one add per key into one output: ~3x faster on CPU than the repeat_interleave below
        # for 26 keys of 80k ids (1.5 vs 4.6 ms), which also writes and reads an [N] shift
        counts = key_counts if on_host else key_counts.tolist()
        if num_keys <= _PER_KEY_ADD_MAX_KEYS and 0 in p.key_row_base:
            # a key of the block's first table keeps its ids: one copy of all, then adds in place
            # for the others (3 calls for the tutorial's 2 keys instead of 7)
            ids, start = values.clone(), 0
            for count, base in zip(counts, p.key_row_base):
                if base:
                    ids.narrow(0, start, count).add_(base)
                start += count
            return ids, None
        ids, start = torch.empty_like(values), 0
        for count, base in zip(counts, p.key_row_base):
            torch.add(values.narrow(0, start, count), base, out=ids.narrow(0, start, count))
            start += count
        return ids, None
    if on_host:
        key_counts = torch.tensor(key_counts, dtype=torch.int64, device=values.device)
    base = torch.tensor(p.key_row_base, dtype=values.dtype, device=values.device)
    shift = repeat_counts(base, key_counts, output_size=values.shape[0])
    ids = values + shift
    if p.covers_all_keys:
        return ids, None
    in_pass = shift >= 0
    return torch.where(in_pass, ids, torch.zeros_like(ids)), in_pass


def key_counts(offsets: torch.Tensor, batch_size: int, num_keys: int) -> torch.Tensor:
    """``[K]`` ids per key, from the key-major offsets without leaving the device."""
    if backends.host_readable(offsets):
        starts = offsets[::batch_size]  # a view: two ops fewer, which a small batch notices
    else:
        # index_select, not offsets[::batch_size]: with a symbolic batch the slice's length is an
        # expression the shape solver cannot reduce to K+1
        starts = offsets.index_select(0, torch.arange(num_keys + 1, device=offsets.device) * batch_size)
    return (starts[1:] - starts[:-1]).long()


def host_key_counts(offsets: torch.Tensor, batch_size: int) -> List[int]:
    """``[K]`` ids per key as host ints, from the key-major offsets (eager CPU: one read of the
    ``K+1`` key starts, fewer calls than :func:`key_counts` and its ``tolist``)."""
    starts = offsets[::batch_size].tolist()
    return [b - a for a, b in zip(starts, starts[1:])]


def inverse_lengths(plan: PooledPlan, offsets: torch.Tensor, num_keys: int,
                    batch_size: int) -> Optional[torch.Tensor]:
    """``[K, B]`` fp32 1/length (1 for empty bags) when some feature pools by MEAN, else None."""
    if not any(any(p.mean) for p in plan.passes):
        return None
    lengths = (offsets[1:] - offsets[:-1]).view(num_keys, batch_size)
    return 1.0 / lengths.clamp(min=1).to(torch.float32)


def in_output_order(p: Pass, plan: PooledPlan, num_keys: int) -> bool:
    """The pass reads every key, and key k is output feature k: its [K, B, D] bags are the
    output's [B, total_dim] up to a transpose."""
    return p.keys == tuple(range(num_keys)) and p.features == tuple(range(len(plan.out_offsets) - 1))


def bag_grads(p: Pass, grad_out: torch.Tensor, plan: PooledPlan, inv_lengths: Optional[torch.Tensor],
              num_keys: int, batch_size: int) -> torch.Tensor:
    """``[B*K, D]`` fp32 gradient of each bag's sum (MEAN scale folded in), batch-major: row
    ``b*K + k`` is key ``k``'s bag ``b`` (see :func:`bag_of_id`); zero for keys outside the pass."""
    if in_output_order(p, plan, num_keys):
        # every key, in output order: grad_out's rows already are the bags, batch-major;
        # a key-major layout would cost a transposing copy of all of grad_out
        grads = grad_out.float().view(batch_size, num_keys, p.dim)
        if inv_lengths is not None and any(p.mean):
            scale = torch.where(torch.tensor(p.mean, device=grad_out.device).unsqueeze(1), inv_lengths, 1.0)
            grads = grads * scale.t().unsqueeze(-1)
        return grads.reshape(batch_size * num_keys, p.dim)
    grads = grad_out.new_zeros((batch_size, num_keys, p.dim), dtype=torch.float32)
    for f, k, mean in zip(p.features, p.keys, p.mean):
        cols = grad_out[:, plan.out_offsets[f]:plan.out_offsets[f + 1]]
        grads[:, k] = cols * inv_lengths[k].unsqueeze(1) if mean else cols
    return grads.view(batch_size * num_keys, p.dim)


def bag_of_id(offsets: torch.Tensor, num_keys: int, batch_size: int, num_ids: int) -> torch.Tensor:
    """``[N]`` batch-major bag of each id: ``b*K + k`` for an id in key ``k``'s bag ``b``."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    # int32 when it fits: half the bytes to sort-gather in the backward
    dtype = torch.int32 if num_keys * batch_size < 2**31 else torch.int64
    bags = torch.arange(num_keys * batch_size, device=offsets.device, dtype=dtype).view(batch_size, num_keys).t()
    return repeat_counts(bags.reshape(-1), lengths, output_size=num_ids)
