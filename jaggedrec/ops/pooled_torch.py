"""The torch path of pooled embedding bags: what runs on CPU, and on GPU with ``backend="torch"``.

The batch arrives as the KJT's raw ``values`` and ``offsets`` (key-major, ``[K*B+1]``).
Instead of one ``embedding_bag`` call per feature, features that share an embedding dim
are served by one call over the whole flat weight block of that dim: each id is shifted
by its table's first row, and ``offsets`` are used as they are, so the call returns
``[K*B, D]`` bag sums for every key at once. Nothing here reads device data to the host,
so the path compiles with static shapes.

A key used by two tables of the same dim (a shared feature) needs a second call, so the
features of one dim are split into *passes* in which each key appears at most once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import statically_known_true

from jaggedrec.ops.host_tasks import run_pieces

POOLING_SUM, POOLING_MEAN = 0, 1

# Eager CPU forward: with at least this many ids per feature on average, one embedding_bag
# per feature (no id shift, one table's rows at a time) beats one call per dim block by 5-10%
# on a 2-core EPYC (8 x 20k ids: 6.0 vs 6.8 ms; 26 x 82k: 64.8 vs 68.3, one thread); with
# fewer, the per-call overhead of many small calls loses (10 x 2.5k ids: 0.34 vs 0.28 ms,
# 100 x 2.5k: 7.5 vs 5.9; 26 x 8k: 5.3 vs 4.8).
_PER_FEATURE_MIN_IDS = 16384

# The per-sample-weight gradient gathers one table row per id; do it in slices so that a
# batch of millions of ids does not allocate [N, D] temporaries at once.
_PSW_GRAD_CHUNK = 1 << 18

# With at least this many ids per key on average, the eager id shift adds each key's table
# base in a call of its own; with fewer, the ~6 us each of those calls cost more than one
# repeat_interleave over all ids (2-core EPYC: 10 keys of 2.5k ids 121 vs 68 us, 26 of 4k
# 314 vs 243 us, 26 of 80k 1.5 vs 4.6 ms).
_PER_KEY_ADD_MIN_IDS = 8192

# fp16/bf16 rows are widened to fp32 before they are summed, this many bytes of widened rows
# at a time (eager CPU), so that the widened copy is still in cache when it is summed; chunks
# much smaller than this pay ~40 us of calls each (2-core EPYC, 82k ids of dim 64: 2 and 4 MB
# chunks 1.7-3.6 ms depending on threads, 16 MB 2.4-4.7).
_WIDE_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class _Pass:
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
    passes: Tuple[_Pass, ...]
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
    passes: List[_Pass] = []
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
            passes.append(_Pass(dim, start, (end - start) // dim, tuple(taken),
                                tuple(keys[f] for f in taken), tuple(base),
                                tuple(pooling[f] == POOLING_MEAN for f in taken)))
            pending = rest
    alignment = 16
    while any(x % alignment for x in (*dims, *weight_offsets)):
        alignment //= 2
    return PooledPlan(tuple(passes), tuple(out_offsets), tuple(rows), alignment)


def _block(weights: torch.Tensor, p: _Pass) -> torch.Tensor:
    return weights.narrow(0, p.weight_start, p.num_rows * p.dim).view(p.num_rows, p.dim)


def _shifted_ids(p: _Pass, values: torch.Tensor,
                 key_counts: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``[N]`` row of each id in the pass's block, and ``[N]`` bool "id belongs to the pass".

    Ids of keys outside the pass point at row 0 (their bags are dropped); the mask is None
    when the pass covers every key.
    """
    # (host readable first: compiled, the id count is unbacked and cannot be compared)
    if p.covers_all_keys and _host_readable(values, key_counts) and (
            values.shape[0] >= _PER_KEY_ADD_MIN_IDS * len(p.key_row_base)):
        # one add per key into one output: ~3x faster on CPU than the repeat_interleave below
        # for 26 keys of 80k ids (1.5 vs 4.6 ms), which also writes and reads an [N] shift
        ids, start = torch.empty_like(values), 0
        for count, base in zip(key_counts.tolist(), p.key_row_base):
            torch.add(values.narrow(0, start, count), base, out=ids.narrow(0, start, count))
            start += count
        return ids, None
    base = torch.tensor(p.key_row_base, dtype=values.dtype, device=values.device)
    shift = torch.repeat_interleave(base, key_counts, output_size=values.shape[0])
    ids = values + shift
    if p.covers_all_keys:
        return ids, None
    in_pass = shift >= 0
    return torch.where(in_pass, ids, torch.zeros_like(ids)), in_pass


def _key_counts(offsets: torch.Tensor, batch: int, num_keys: int) -> torch.Tensor:
    """``[K]`` ids per key, from the key-major offsets without leaving the device."""
    if _host_readable(offsets):
        starts = offsets[::batch]  # a view: two ops fewer, which a small batch notices
    else:
        # index_select, not offsets[::batch]: with a symbolic batch the slice's length is an
        # expression the shape solver cannot reduce to K+1
        starts = offsets.index_select(0, torch.arange(num_keys + 1, device=offsets.device) * batch)
    return (starts[1:] - starts[:-1]).long()


def pooled_forward(weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                   per_sample_weights: Optional[torch.Tensor], plan: PooledPlan,
                   num_keys: int) -> torch.Tensor:
    """Pooled embeddings of every feature.

    Args:
        weights: ``[W]`` flat table storage.
        values: ``[N]`` ids, key-major.
        offsets: ``[K*B+1]`` bag starts.
        per_sample_weights: ``[N]`` or None.
    Returns:
        ``[B, total_dim]`` fp32, feature ``f`` in columns ``plan.out_offsets[f]:[f+1]``.
    """
    batch = (offsets.shape[0] - 1) // num_keys
    if batch == 0:
        return weights.new_zeros((0, plan.out_offsets[-1]), dtype=torch.float32)
    if not _host_readable(values, offsets):
        return _forward_batched(weights, values, offsets, per_sample_weights, plan, num_keys, batch)
    if len(plan.passes) == 1 or len({p.dim for p in plan.passes}) == 1:
        # every bag one id: the offsets are 0, 1, 2, ... (one compare, no temporaries)
        if values.shape[0] == num_keys * batch and torch.equal(offsets, _arange(num_keys * batch + 1, offsets.dtype)):
            return _forward_one_id_per_bag(weights, values, per_sample_weights, plan, num_keys, batch)
    if values.shape[0] < _PER_FEATURE_MIN_IDS * len(plan.feature_rows):
        return _forward_batched(weights, values, offsets, per_sample_weights, plan, num_keys, batch)
    return _forward_per_feature(weights, values, offsets, per_sample_weights, plan, num_keys, batch)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _host_readable(*tensors: torch.Tensor) -> bool:
    """Real CPU tensors in eager mode: reading a few offsets costs nothing and breaks no graph."""
    return (not torch.compiler.is_compiling() and all(t.device.type == "cpu" for t in tensors)
            # a plain tensor's type says it is real, faster than asking is_fake
            and all(type(t) in _PLAIN_TENSORS or not is_fake(t) for t in tensors))


def _pooled_rows(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, psw: Optional[torch.Tensor],
                 mean: bool) -> torch.Tensor:
    """``[n, D]`` fp32: bag ``i`` pools ``table[ids[offsets[i]:offsets[i+1]]]``, times ``psw``
    (``[N]`` or None), summed in fp32; ``mean`` divides by the bag length (unweighted only).

    Args:
        ids: ``[N]`` rows of ``table`` (``[R, D]``); offsets: ``[n+1]``, in the ids' dtype.
    """
    mode = "mean" if mean else "sum"
    if table.dtype == torch.float32:
        return F.embedding_bag(ids, table, offsets, mode=mode, include_last_offset=True,
                               per_sample_weights=None if psw is None else psw.to(torch.float32))
    # embedding_bag sums fp16/bf16 rows into an output of their own dtype: two fp16 rows of 40000
    # would give inf, and bf16 1 + 2**-8 would give 1. So gather, widen, then sum widened rows.
    num_bags = offsets.shape[0] - 1
    if not _host_readable(ids, offsets):
        return _widened_sums(ids, table, offsets, psw, mode)
    out = torch.empty((num_bags, table.shape[1]), dtype=torch.float32)
    chunk_ids = max(1, _WIDE_CHUNK_BYTES // (4 * table.shape[1]))
    # chunks of whole bags, about chunk_ids ids each (a longer bag is a chunk of its own)
    bounds = torch.searchsorted(offsets, torch.arange(0, ids.shape[0], chunk_ids, dtype=offsets.dtype)).tolist()
    bounds = sorted(set(min(b, num_bags) for b in bounds) | {0, num_bags})
    starts = offsets[bounds].tolist()
    for lo, hi, a, b in zip(bounds, bounds[1:], starts, starts[1:]):
        out[lo:hi] = _widened_sums(ids[a:b], table, offsets[lo:hi + 1] - a, None if psw is None else psw[a:b], mode)
    return out


_ARANGES: Dict[torch.dtype, torch.Tensor] = {}


def _arange(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n]`` 0, 1, ..., n-1 on the CPU: a view of one kept tensor per dtype, grown as needed,
    so that batches and chunks of any size reuse it."""
    kept = _ARANGES.get(dtype)
    if kept is None or kept.shape[0] < n:
        kept = _ARANGES[dtype] = torch.arange(max(n, 2 * (0 if kept is None else kept.shape[0])), dtype=dtype)
    return kept[:n]


def _widened_sums(ids, table, offsets, psw, mode) -> torch.Tensor:
    """``[n, D]`` fp32 bag sums of ``table``'s fp16/bf16 rows: the rows gathered in their own
    dtype, widened, weighted, then summed in fp32."""
    rows = _gathered_rows(ids, table).to(torch.float32)
    if psw is not None:
        rows.mul_(psw.to(torch.float32).unsqueeze(1))
    positions = _positions(ids.shape[0], offsets.dtype, ids.device)
    return F.embedding_bag(positions, rows, offsets, mode=mode, include_last_offset=True)


def _gathered_rows(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` ``table[ids]`` in the table's dtype. Eagerly on the CPU, as bags of one id:
    such a bag is its row, exact in any dtype, and embedding_bag's CPU kernel prefetches the
    rows it reads: fp16 rows came ~1.7x faster than from index_select (1.3 vs 2.2 ms for 82k
    rows of 64, one thread), fp32 ones ~1.4x."""
    if _host_readable(ids, table):
        return F.embedding_bag(ids, table, _arange(ids.shape[0] + 1, ids.dtype), mode="sum", include_last_offset=True)
    return table.index_select(0, ids)


def _positions(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n]`` 0, 1, ..., n-1: cached on the CPU in eager code, made afresh elsewhere."""
    if device.type == "cpu" and not torch.compiler.is_compiling() and isinstance(n, int):
        return _arange(n, dtype)
    return torch.arange(n, dtype=dtype, device=device)


def _forward_one_id_per_bag(weights, values, per_sample_weights, plan, num_keys, batch) -> torch.Tensor:
    """Eager CPU, every bag holding exactly one id (one-hot features), all tables of one dim.

    Pooling one row is the row itself (times its weight), so the output is a row gather,
    taken batch-major so that it lands in output layout with no copy. fp32 rows go through
    ``embedding_bag``, one id per bag, weights and all: its CPU kernel prefetches the rows it
    is about to read, and gathered them ~1.4x faster than ``index_select`` with one thread on
    a 2-core EPYC (5.1 vs 7.1 ms for 106k rows of 64 floats; alike with two threads)."""
    p = plan.passes[0]
    features = sorted((f, k, p.key_row_base[k]) for p in plan.passes for f, k in zip(p.features, p.keys))
    keys = [k for _, k, _ in features]
    base = torch.tensor([row for _, _, row in features], dtype=values.dtype)
    by_key = values.view(num_keys, batch)
    if keys != list(range(num_keys)):
        by_key = by_key.index_select(0, torch.tensor(keys))
    ids = torch.empty((batch, len(features)), dtype=values.dtype)
    torch.add(by_key.t(), base, out=ids)  # [B, F], written once in batch-major order
    ids = ids.view(-1)
    psw = None
    if per_sample_weights is not None:
        psw = per_sample_weights.view(num_keys, batch)[keys].t().reshape(-1).to(torch.float32)
    block = _block(weights, p).detach()
    if block.dtype == torch.float32:
        rows = F.embedding_bag(ids, block, _arange(ids.shape[0] + 1, ids.dtype), mode="sum", per_sample_weights=psw,
                               include_last_offset=True)
    else:  # widened before the weights multiply it: fp16 40000 times 2 is no fp16
        rows = _gathered_rows(ids, block).float()
        if psw is not None:
            rows.mul_(psw.unsqueeze(1))
    return rows.view(batch, plan.out_offsets[-1])


def _forward_per_feature(weights, values, offsets, per_sample_weights, plan, num_keys, batch) -> torch.Tensor:
    """Eager CPU: one ``embedding_bag`` per feature on its own table's rows, so that each
    call gathers from one table (cache friendly) and needs no id shift; the features are
    pieces of work for ``host_tasks`` (one thread each), written into their output columns."""
    starts = offsets[::batch].tolist()  # [K+1] first id of each key
    out = torch.empty((batch, plan.out_offsets[-1]), dtype=torch.float32)

    def pool(p: _Pass, f: int, k: int, mean: bool) -> None:
        first, last = starts[k], starts[k + 1]
        table = _block(weights, p).detach().narrow(0, p.key_row_base[k], plan.feature_rows[f])
        psw = None if per_sample_weights is None else per_sample_weights[first:last]
        # [B+1] the key's bags within its own ids (embedding_bag wants offsets from 0)
        bag_offsets = (offsets[k * batch:(k + 1) * batch + 1] - first).to(values.dtype)
        # unweighted MEAN is embedding_bag's own mode; weighted MEAN sums here, divides below
        pooled = _pooled_rows(values[first:last], table, bag_offsets, psw, mean and psw is None)
        if mean and psw is not None:
            pooled = pooled / (bag_offsets[1:] - bag_offsets[:-1]).clamp(min=1).unsqueeze(1)
        out[:, plan.out_offsets[f]:plan.out_offsets[f + 1]] = pooled

    run_pieces([functools.partial(pool, p, f, k, mean) for p in plan.passes
                for f, k, mean in zip(p.features, p.keys, p.mean)])
    return out


def _forward_batched(weights, values, offsets, per_sample_weights, plan, num_keys, batch) -> torch.Tensor:
    """Compiled or GPU: one ``embedding_bag`` per pass over all ids, no host reads, static shapes."""
    key_counts = _key_counts(offsets, batch, num_keys)
    inv_lengths = _inverse_lengths(plan, offsets, num_keys, batch)
    pieces = {}
    for p in plan.passes:
        table = _block(weights, p).detach()
        ids, _ = _shifted_ids(p, values, key_counts)
        bags = _pooled_rows(ids, table, offsets.to(values.dtype), per_sample_weights, False).view(num_keys, batch, p.dim)
        if _in_output_order(p, plan, num_keys):
            # one transposing copy into [B, total_dim]; a cat of K slices costs ~1.5x more
            if inv_lengths is not None and any(p.mean):
                mean = torch.tensor(p.mean, device=bags.device).unsqueeze(1)
                bags = bags * torch.where(mean, inv_lengths, 1.0).unsqueeze(-1)
            return bags.transpose(0, 1).reshape(batch, plan.out_offsets[-1])
        for f, k, mean in zip(p.features, p.keys, p.mean):
            pieces[f] = bags[k] * inv_lengths[k].unsqueeze(1) if mean else bags[k]
    # [B, D] blocks of each key -> [B, total_dim] feature columns, in one copy
    return torch.cat([pieces[f] for f in range(len(pieces))], dim=1)


def _inverse_lengths(plan: PooledPlan, offsets: torch.Tensor, num_keys: int, batch: int) -> Optional[torch.Tensor]:
    """``[K, B]`` fp32 1/length (1 for empty bags) when some feature pools by MEAN, else None."""
    if not any(any(p.mean) for p in plan.passes):
        return None
    lengths = (offsets[1:] - offsets[:-1]).view(num_keys, batch)
    return 1.0 / lengths.clamp(min=1).to(torch.float32)


def _in_output_order(p: _Pass, plan: PooledPlan, num_keys: int) -> bool:
    """The pass reads every key, and key k is output feature k: its [K, B, D] bags are the
    output's [B, total_dim] up to a transpose."""
    return p.keys == tuple(range(num_keys)) and p.features == tuple(range(len(plan.out_offsets) - 1))


def _bag_grads(p: _Pass, grad_out: torch.Tensor, plan: PooledPlan, inv_lengths: Optional[torch.Tensor],
               num_keys: int, batch: int) -> torch.Tensor:
    """``[B*K, D]`` fp32 gradient of each bag's sum (MEAN scale folded in), batch-major: row
    ``b*K + k`` is key ``k``'s bag ``b`` (see :func:`_bag_of_id`); zero for keys outside the pass."""
    if _in_output_order(p, plan, num_keys):
        # every key, in output order: grad_out's rows already are the bags, batch-major;
        # a key-major layout would cost a transposing copy of all of grad_out
        bag_grads = grad_out.float().view(batch, num_keys, p.dim)
        if inv_lengths is not None and any(p.mean):
            scale = torch.where(torch.tensor(p.mean, device=grad_out.device).unsqueeze(1), inv_lengths, 1.0)
            bag_grads = bag_grads * scale.t().unsqueeze(-1)
        return bag_grads.reshape(batch * num_keys, p.dim)
    bag_grads = grad_out.new_zeros((batch, num_keys, p.dim), dtype=torch.float32)
    for f, k, mean in zip(p.features, p.keys, p.mean):
        cols = grad_out[:, plan.out_offsets[f]:plan.out_offsets[f + 1]]
        bag_grads[:, k] = cols * inv_lengths[k].unsqueeze(1) if mean else cols
    return bag_grads.view(batch * num_keys, p.dim)


def _bag_of_id(offsets: torch.Tensor, num_keys: int, batch: int, num_ids: int) -> torch.Tensor:
    """``[N]`` batch-major bag of each id: ``b*K + k`` for an id in key ``k``'s bag ``b``."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    # int32 when it fits: half the bytes to sort-gather in the backward
    dtype = torch.int32 if num_keys * batch < 2**31 else torch.int64
    bags = torch.arange(num_keys * batch, device=offsets.device, dtype=dtype).view(batch, num_keys).t()
    return torch.repeat_interleave(bags.reshape(-1), lengths, output_size=num_ids)


class RowRuns(NamedTuple):
    """Ids sorted by row: each touched row's run of ids is a bag over the bag gradients."""

    rows: Optional[torch.Tensor]  # [U] touched rows ascending (eager), or None (all rows)
    run_offsets: torch.Tensor     # [U+1] (or [num_rows+1]) start of each row's run
    bags: torch.Tensor            # [N] bag of each sorted id
    weights: Optional[torch.Tensor]  # [N] fp32 per-sample weight of each sorted id, or None


def _sort_rows(ids: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` ids sorted (int32 when rows fit), and ``[N]`` the order that sorts them. Stable,
    so each run of equal ids, and any sum over it, comes out the same on every run."""
    narrow = ids.to(torch.int32) if num_rows < 2**31 else ids  # int32 sorts ~2x faster
    return torch.sort(narrow, stable=True)


def _row_runs(sorted_ids: torch.Tensor, order: torch.Tensor, bag_of_id: torch.Tensor, psw: Optional[torch.Tensor],
              num_rows: int, unique: bool) -> RowRuns:
    """Runs of equal rows in sorted ids (see :func:`_sort_rows`). ``unique`` keeps only
    touched rows (eager only: U depends on the data); otherwise every row gets a run, empty
    for untouched ones."""
    if unique:
        rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    elif _host_readable(sorted_ids):  # ~2.5x faster than the scatter below; its size depends on the data
        rows, counts = None, torch.bincount(sorted_ids, minlength=num_rows)
    else:
        rows = None
        counts = torch.zeros(num_rows, dtype=torch.int64, device=sorted_ids.device)
        counts.scatter_add_(0, sorted_ids.long(), torch.ones_like(sorted_ids, dtype=torch.int64))
    # index_select, not bag_of_id[order]: the advanced-indexing gather is ~2x slower on CPU
    return RowRuns(rows, F.pad(counts.cumsum(0), (1, 0)), bag_of_id.index_select(0, order),
                   None if psw is None else psw.index_select(0, order).float())


def _sum_rows_by_id(ids: torch.Tensor, bag_of_id: torch.Tensor, bag_grads: torch.Tensor,
                    psw: Optional[torch.Tensor], num_rows: int, unique: bool):
    """Sum ``psw[i] * bag_grads[bag_of_id[i]]`` over the ids of each row.

    The backward of a gather-and-pool is itself a gather-and-pool: each row's run of ids
    (:func:`_row_runs`) becomes a bag over ``bag_grads``.

    Returns ``(rows, sums)``: with ``unique`` the touched rows ``[U]`` and ``[U, D]`` sums;
    otherwise ``None`` and dense ``[num_rows, D]`` sums.
    """
    runs = _row_runs(*_sort_rows(ids, num_rows), bag_of_id, psw, num_rows, unique)
    sums = F.embedding_bag(runs.bags, bag_grads, runs.run_offsets, mode="sum", per_sample_weights=runs.weights,
                           include_last_offset=True)
    return runs.rows, sums


def pooled_backward(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor,
                    offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor], plan: PooledPlan,
                    num_keys: int, need_weight_grad: bool,
                    need_psw_grad: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Dense gradients of :func:`pooled_forward`.

    Args:
        grad_out: ``[B, total_dim]``.
    Returns:
        ``[W]`` weight gradient in the weights' dtype (or None), ``[N]`` per-sample-weight
        gradient (or None).
    """
    batch = (offsets.shape[0] - 1) // num_keys
    grad_weights = torch.zeros_like(weights, dtype=torch.float32) if need_weight_grad else None
    grad_psw = torch.zeros(values.shape[0], dtype=torch.float32, device=values.device) if need_psw_grad else None
    # In a compiled graph the id count is unbacked (see KeyedJaggedTensor): it cannot be
    # tested without a guard, and the general path below serves 0 ids too.
    if statically_known_true(batch == 0) or statically_known_true(values.shape[0] == 0):
        return _cast(grad_weights, weights.dtype), grad_psw
    key_counts = _key_counts(offsets, batch, num_keys)
    bag_of_id = _bag_of_id(offsets, num_keys, batch, values.shape[0])
    inv_lengths = _inverse_lengths(plan, offsets, num_keys, batch)
    eager = _host_readable(values, offsets)
    for p in plan.passes:
        ids, _ = _shifted_ids(p, values, key_counts)
        bag_grads = _bag_grads(p, grad_out, plan, inv_lengths, num_keys, batch)
        if need_weight_grad:
            block_grad = grad_weights.narrow(0, p.weight_start, p.num_rows * p.dim).view(p.num_rows, p.dim)
            if eager:  # only the touched rows: far less memory traffic than a dense [rows, D] sum
                rows, sums = _sum_rows_by_id(ids, bag_of_id, bag_grads, per_sample_weights, p.num_rows, unique=True)
                block_grad.index_add_(0, rows.long(), sums)
            else:
                _, sums = _sum_rows_by_id(ids, bag_of_id, bag_grads, per_sample_weights, p.num_rows, unique=False)
                block_grad.add_(sums)
        if need_psw_grad:
            table = _block(weights, p)
            for lo, hi in _psw_chunks(values.shape[0]):
                rows = table[ids[lo:hi]].float()
                grad_psw[lo:hi] += (rows * bag_grads[bag_of_id[lo:hi]]).sum(1)
    return _cast(grad_weights, weights.dtype), grad_psw


def _psw_chunks(num_ids) -> List[Tuple[int, int]]:
    """Slices of the ids for the per-sample-weight gradient. A symbolic count (compiled) is
    one slice: looping over it would guard on its value."""
    if not isinstance(num_ids, int):
        return [(0, num_ids)]
    return [(lo, min(lo + _PSW_GRAD_CHUNK, num_ids)) for lo in range(0, num_ids, _PSW_GRAD_CHUNK)]


def pooled_row_grads(grad_out: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                     per_sample_weights: Optional[torch.Tensor], plan: PooledPlan, num_keys: int,
                     id_read: Optional[torch.Tensor] = None) -> List[Tuple[_Pass, torch.Tensor, torch.Tensor]]:
    """Per pass, the touched rows ``[U]`` of its block and their summed gradients ``[U, D]`` fp32
    (``id_read``: ``[N]`` bool, the ids that count; None: all)."""
    batch = (offsets.shape[0] - 1) // num_keys
    if batch == 0 or values.shape[0] == 0:
        return []
    key_counts = _key_counts(offsets, batch, num_keys)
    bag_of_id = _bag_of_id(offsets, num_keys, batch, values.shape[0])
    inv_lengths = _inverse_lengths(plan, offsets, num_keys, batch)
    out = []
    for p in plan.passes:
        ids, in_pass = _shifted_ids(p, values, key_counts)
        if id_read is not None:
            in_pass = id_read if in_pass is None else in_pass & id_read
        bag_grads = _bag_grads(p, grad_out, plan, inv_lengths, num_keys, batch)
        bags, psw = bag_of_id, per_sample_weights
        if in_pass is not None:  # only rows this pass really touches
            ids, bags = ids[in_pass], bags[in_pass]
            psw = None if psw is None else psw[in_pass]
        rows, sums = _sum_rows_by_id(ids, bags, bag_grads, psw, p.num_rows, unique=True)
        out.append((p, rows, sums))
    return out


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)

