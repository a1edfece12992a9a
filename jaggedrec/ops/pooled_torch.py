"""The torch path of pooled embedding bags: what runs on CPU, and on GPU with ``backend="torch"``.

The batch arrives as the KJT's raw ``values`` and ``offsets`` (key-major, ``[K*B+1]``). The
features are served a *pass* at a time (``pooled_plan``): one ``embedding_bag`` call over the
flat weight block of a dim, each id shifted by its table's first row, returns ``[K*B, D]`` bag
sums for every key at once. That batched path reads no device data to the host, so it
compiles with static shapes; eagerly on the CPU, where reading a few offsets costs nothing,
one-hot batches and long features take faster paths. The backward sums each touched row's
gradient over its run of ids (``runs_torch``).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from jaggedrec.ops import backends, vbe
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.host_tasks import run_pieces
from jaggedrec.ops.op_args import OpBatch
from jaggedrec.ops.pooled_plan import (Pass, PooledPlan, bag_grads, bag_of_id, block_view, host_key_counts,
                                       in_output_order, inverse_lengths, key_counts, shifted_ids)
from jaggedrec.ops.runs_torch import sum_rows_by_id

# Eager CPU forward: with at least this many ids per feature on average, one embedding_bag
# per feature (no id shift, one table's rows at a time) beats one call per dim block by 5-10%
# on a 2-core EPYC (8 x 20k ids: 6.0 vs 6.8 ms; 26 x 82k: 64.8 vs 68.3, one thread); with
# fewer, the per-call overhead of many small calls loses (10 x 2.5k ids: 0.34 vs 0.28 ms,
# 100 x 2.5k: 7.5 vs 5.9; 26 x 8k: 5.3 vs 4.8).
_PER_FEATURE_MIN_IDS = 16384

# The per-sample-weight gradient gathers one table row per id; do it in slices so that a
# batch of millions of ids does not allocate [N, D] temporaries at once.
_PSW_GRAD_CHUNK = 1 << 18

# fp16/bf16 rows are widened to fp32 before they are summed, this many bytes of widened rows
# at a time (eager CPU), so that the widened copy is still in cache when it is summed; chunks
# much smaller than this pay ~40 us of calls each (2-core EPYC, 82k ids of dim 64: 2 and 4 MB
# chunks 1.7-3.6 ms depending on threads, 16 MB 2.4-4.7).
_WIDE_CHUNK_BYTES = 4 << 20


def pooled_forward(weights: torch.Tensor, batch: OpBatch, tables: FeatureTables) -> torch.Tensor:
    """Pooled embeddings of every feature, one row per bag slot (VBE: the caller expands them).

    Args:
        weights: ``[W]`` flat table storage.
        batch: ``[N]`` ids, ``[K*B+1]`` bag starts, ``[N]`` per-sample weights or None.
    Returns:
        ``[B, total_dim]`` fp32, feature ``f`` in columns ``plan.out_offsets[f]:[f+1]``.
    """
    plan, num_keys = tables.plan, tables.num_keys
    values, offsets = batch.values, batch.offsets
    batch_size = batch.bags_per_key(num_keys)
    if batch_size == 0:
        return weights.new_zeros((0, plan.out_offsets[-1]), dtype=torch.float32)
    if not backends.host_readable(values, offsets):
        return _forward_batched(weights, batch, plan, num_keys, batch_size)
    if len(plan.passes) == 1 or len({p.dim for p in plan.passes}) == 1:
        # every bag one id: the offsets are 0, 1, 2, ... (one compare, no temporaries)
        if values.shape[0] == num_keys * batch_size and torch.equal(
                offsets, backends.host_arange(num_keys * batch_size + 1, offsets.dtype)):
            return _forward_one_id_per_bag(weights, batch, plan, num_keys, batch_size)
    if values.shape[0] < _PER_FEATURE_MIN_IDS * len(plan.feature_rows):
        return _forward_batched(weights, batch, plan, num_keys, batch_size)
    return _forward_per_feature(weights, batch, plan, num_keys, batch_size)


def pooled_rows(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: Optional[torch.Tensor], mean: bool) -> torch.Tensor:
    """``[n, D]`` fp32: bag ``i`` pools ``table[ids[offsets[i]:offsets[i+1]]]``, times
    ``per_sample_weights`` (``[N]`` or None), summed in fp32; ``mean`` divides by the bag
    length (unweighted only).

    Args:
        ids: ``[N]`` rows of ``table`` (``[R, D]``); offsets: ``[n+1]``, in the ids' dtype.
    """
    mode = "mean" if mean else "sum"
    if table.dtype == torch.float32:
        return F.embedding_bag(ids, table, offsets, mode=mode, include_last_offset=True,
                               per_sample_weights=None if per_sample_weights is None
                               else per_sample_weights.to(torch.float32))
    # embedding_bag sums fp16/bf16 rows into an output of their own dtype: two fp16 rows of 40000
    # would give inf, and bf16 1 + 2**-8 would give 1. So gather, widen, then sum widened rows.
    num_bags = offsets.shape[0] - 1
    if not backends.host_readable(ids, offsets):
        return _widened_sums(ids, table, offsets, per_sample_weights, mode)
    out = torch.empty((num_bags, table.shape[1]), dtype=torch.float32)
    chunk_ids = max(1, _WIDE_CHUNK_BYTES // (4 * table.shape[1]))
    # chunks of whole bags, about chunk_ids ids each (a longer bag is a chunk of its own)
    bounds = torch.searchsorted(offsets, torch.arange(0, ids.shape[0], chunk_ids, dtype=offsets.dtype)).tolist()
    bounds = sorted(set(min(b, num_bags) for b in bounds) | {0, num_bags})
    starts = offsets[bounds].tolist()
    for lo, hi, a, b in zip(bounds, bounds[1:], starts, starts[1:]):
        out[lo:hi] = _widened_sums(ids[a:b], table, offsets[lo:hi + 1] - a,
                                   None if per_sample_weights is None else per_sample_weights[a:b], mode)
    return out


def _widened_sums(ids, table, offsets, per_sample_weights, mode) -> torch.Tensor:
    """``[n, D]`` fp32 bag sums of ``table``'s fp16/bf16 rows: the rows gathered in their own
    dtype, widened, weighted, then summed in fp32."""
    rows = _gathered_rows(ids, table).to(torch.float32)
    if per_sample_weights is not None:
        rows.mul_(per_sample_weights.to(torch.float32).unsqueeze(1))
    positions = _positions(ids.shape[0], offsets.dtype, ids.device)
    return F.embedding_bag(positions, rows, offsets, mode=mode, include_last_offset=True)


def _gathered_rows(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` ``table[ids]`` in the table's dtype. Eagerly on the CPU, as bags of one id:
    such a bag is its row, exact in any dtype, and embedding_bag's CPU kernel prefetches the
    rows it reads: fp16 rows came ~1.7x faster than from index_select (1.3 vs 2.2 ms for 82k
    rows of 64, one thread), fp32 ones ~1.4x."""
    if backends.host_readable(ids, table):
        return F.embedding_bag(ids, table, backends.host_arange(ids.shape[0] + 1, ids.dtype), mode="sum",
                               include_last_offset=True)
    return table.index_select(0, ids)


def _positions(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n]`` 0, 1, ..., n-1: cached on the CPU in eager code, made afresh elsewhere."""
    if device.type == "cpu" and not torch.compiler.is_compiling() and isinstance(n, int):
        return backends.host_arange(n, dtype)
    return torch.arange(n, dtype=dtype, device=device)


def _forward_one_id_per_bag(weights, batch: OpBatch, plan: PooledPlan, num_keys: int,
                            batch_size: int) -> torch.Tensor:
    """Eager CPU, every bag holding exactly one id (one-hot features), all tables of one dim.

    Pooling one row is the row itself (times its per-sample weight), so the output is a row
    gather, taken batch-major so that it lands in output layout with no copy. fp32 rows go
    through ``embedding_bag``, one id per bag, per-sample weights and all: its CPU kernel
    prefetches the rows it is about to read, and gathered them ~1.4x faster than
    ``index_select`` with one thread on a 2-core EPYC (5.1 vs 7.1 ms for 106k rows of 64
    floats; alike with two threads)."""
    values = batch.values
    p = plan.passes[0]
    features = sorted((f, k, p.key_row_base[k]) for p in plan.passes for f, k in zip(p.features, p.keys))
    keys = [k for _, k, _ in features]
    base = torch.tensor([row for _, _, row in features], dtype=values.dtype)
    by_key = values.view(num_keys, batch_size)
    if keys != list(range(num_keys)):
        by_key = by_key.index_select(0, torch.tensor(keys))
    ids = torch.empty((batch_size, len(features)), dtype=values.dtype)
    torch.add(by_key.t(), base, out=ids)  # [B, F], written once in batch-major order
    ids = ids.view(-1)
    per_sample_weights = None
    if batch.per_sample_weights is not None:
        per_sample_weights = batch.per_sample_weights.view(num_keys, batch_size)[keys].t().reshape(-1).to(
            torch.float32)
    block = block_view(weights, p).detach()
    if block.dtype == torch.float32:
        rows = F.embedding_bag(ids, block, backends.host_arange(ids.shape[0] + 1, ids.dtype), mode="sum",
                               per_sample_weights=per_sample_weights, include_last_offset=True)
    else:  # widened before the per-sample weights multiply it: fp16 40000 times 2 is no fp16
        rows = _gathered_rows(ids, block).float()
        if per_sample_weights is not None:
            rows.mul_(per_sample_weights.unsqueeze(1))
    return rows.view(batch_size, plan.out_offsets[-1])


def _forward_per_feature(weights, batch: OpBatch, plan: PooledPlan, num_keys: int, batch_size: int) -> torch.Tensor:
    """Eager CPU: one ``embedding_bag`` per feature on its own table's rows, so that each
    call gathers from one table (cache friendly) and needs no id shift; the features are
    pieces of work for ``host_tasks`` (one thread each), written into their output columns."""
    values, offsets = batch.values, batch.offsets
    starts = offsets[::batch_size].tolist()  # [K+1] first id of each key
    out = torch.empty((batch_size, plan.out_offsets[-1]), dtype=torch.float32)

    def pool(p: Pass, f: int, k: int, mean: bool) -> None:
        first, last = starts[k], starts[k + 1]
        table = block_view(weights, p).detach().narrow(0, p.key_row_base[k], plan.feature_rows[f])
        per_sample_weights = None if batch.per_sample_weights is None else batch.per_sample_weights[first:last]
        # [B+1] the key's bags within its own ids (embedding_bag wants offsets from 0)
        bag_offsets = (offsets[k * batch_size:(k + 1) * batch_size + 1] - first).to(values.dtype)
        # unweighted MEAN is embedding_bag's own mode; weighted MEAN sums here, divides below
        pooled = pooled_rows(values[first:last], table, bag_offsets, per_sample_weights,
                             mean and per_sample_weights is None)
        if mean and per_sample_weights is not None:
            pooled = pooled / (bag_offsets[1:] - bag_offsets[:-1]).clamp(min=1).unsqueeze(1)
        out[:, plan.out_offsets[f]:plan.out_offsets[f + 1]] = pooled

    run_pieces([functools.partial(pool, p, f, k, mean) for p in plan.passes
                for f, k, mean in zip(p.features, p.keys, p.mean)])
    return out


def _forward_batched(weights, batch: OpBatch, plan: PooledPlan, num_keys: int, batch_size: int) -> torch.Tensor:
    """Compiled or GPU: one ``embedding_bag`` per pass over all ids, no host reads, static shapes."""
    values, offsets = batch.values, batch.offsets
    if backends.host_readable(values, offsets):
        counts = host_key_counts(offsets, batch_size)
    else:
        counts = key_counts(offsets, batch_size, num_keys)
    inv_lengths = inverse_lengths(plan, offsets, num_keys, batch_size)
    pieces = {}
    if offsets.dtype != values.dtype:
        offsets = offsets.to(values.dtype)
    for p in plan.passes:
        block = block_view(weights, p)
        if torch.is_grad_enabled():  # (the op's body runs with autograd off, but traced it may not)
            block = block.detach()
        ids, _ = shifted_ids(p, values, counts)
        bags = pooled_rows(ids, block, offsets, batch.per_sample_weights, False).view(num_keys, batch_size, p.dim)
        if in_output_order(p, plan, num_keys):
            # one transposing copy into [B, total_dim]; a cat of K slices costs ~1.5x more
            if inv_lengths is not None and any(p.mean):
                mean = torch.tensor(p.mean, device=bags.device).unsqueeze(1)
                bags = bags * torch.where(mean, inv_lengths, 1.0).unsqueeze(-1)
            return bags.transpose(0, 1).reshape(batch_size, plan.out_offsets[-1])
        for f, k, mean in zip(p.features, p.keys, p.mean):
            pieces[f] = bags[k] * inv_lengths[k].unsqueeze(1) if mean else bags[k]
    # [B, D] blocks of each key -> [B, total_dim] feature columns, in one copy
    return torch.cat([pieces[f] for f in range(len(pieces))], dim=1)


def pooled_backward(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                    need_weight_grad: bool,
                    need_psw_grad: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Dense gradients of :func:`pooled_forward`.

    Args:
        grad_out: ``[B, total_dim]``, one row per bag slot.
    Returns:
        ``[W]`` weight gradient in the weights' dtype (or None), ``[N]`` per-sample-weight
        gradient (or None).
    """
    plan, num_keys = tables.plan, tables.num_keys
    values, offsets, per_sample_weights = batch.values, batch.offsets, batch.per_sample_weights
    batch_size = batch.bags_per_key(num_keys)
    grad_weights = torch.zeros_like(weights, dtype=torch.float32) if need_weight_grad else None
    grad_psw = torch.zeros(values.shape[0], dtype=torch.float32, device=values.device) if need_psw_grad else None
    # In a compiled graph the id count is unbacked (see KeyedJaggedTensor): it cannot be
    # tested without a guard, and the general path below serves 0 ids too.
    if statically_known_true(batch_size == 0) or statically_known_true(values.shape[0] == 0):
        return _cast(grad_weights, weights.dtype), grad_psw
    counts = key_counts(offsets, batch_size, num_keys)
    bag_of_ids = bag_of_id(offsets, num_keys, batch_size, values.shape[0])
    inv_lengths = inverse_lengths(plan, offsets, num_keys, batch_size)
    eager = backends.host_readable(values, offsets)
    for p in plan.passes:
        ids, _ = shifted_ids(p, values, counts)
        grads = bag_grads(p, grad_out, plan, inv_lengths, num_keys, batch_size)
        if need_weight_grad:
            block_grad = block_view(grad_weights, p)
            if eager:  # only the touched rows: far less memory traffic than a dense [rows, D] sum
                rows, sums = sum_rows_by_id(ids, bag_of_ids, grads, per_sample_weights, p.num_rows, unique=True)
                block_grad.index_add_(0, rows.long(), sums)
            else:
                _, sums = sum_rows_by_id(ids, bag_of_ids, grads, per_sample_weights, p.num_rows, unique=False)
                block_grad.add_(sums)
        if need_psw_grad:
            block = block_view(weights, p)
            if eager and block.dtype == torch.float32:
                # torch's own kernel: each id's row dotted with its bag's gradient in one pass, no
                # [N, D] temporaries: ~5x faster than the gathers below (163k ids of dim 64, one
                # thread, 2-core Xeon); the bags' offsets are not read in sum mode
                grad_psw += torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grads, block.detach(), ids, offsets.to(ids.dtype), bag_of_ids.to(ids.dtype), 0, -1)
                continue
            for lo, hi in _psw_chunks(values.shape[0]):
                rows = block[ids[lo:hi]].float()
                grad_psw[lo:hi] += (rows * grads[bag_of_ids[lo:hi]]).sum(1)
    return _cast(grad_weights, weights.dtype), grad_psw


def _psw_chunks(num_ids) -> List[Tuple[int, int]]:
    """Slices of the ids for the per-sample-weight gradient. A symbolic count (compiled) is
    one slice: looping over it would guard on its value."""
    if not isinstance(num_ids, int):
        return [(0, num_ids)]
    return [(lo, min(lo + _PSW_GRAD_CHUNK, num_ids)) for lo in range(0, num_ids, _PSW_GRAD_CHUNK)]


def pooled_sparse_grad(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch,
                       tables: FeatureTables) -> torch.Tensor:
    """``[W]`` sparse COO gradient holding only the elements of touched rows (VBE: of bags some
    sample reads); ``grad_out`` has one row per bag slot. Eager: its size depends on the data."""
    index_parts, value_parts = [], []
    id_read = vbe.ids_read(batch.inverse_indices, tables, batch.offsets, batch.num_ids)
    for p, touched, sums in _row_grads(grad_out, batch, tables, id_read):
        first = p.weight_start + touched.long() * p.dim
        index_parts.append((first.unsqueeze(1) + torch.arange(p.dim, device=first.device)).reshape(-1))
        value_parts.append(sums.reshape(-1))
    if not index_parts:
        return torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=weights.device),
                                       weights.new_empty(0), weights.shape)
    grad = torch.sparse_coo_tensor(torch.cat(index_parts).unsqueeze(0), torch.cat(value_parts).to(weights.dtype),
                                   weights.shape, is_coalesced=len(index_parts) == 1, check_invariants=False)
    return grad if len(index_parts) == 1 else grad.coalesce()


def _row_grads(grad_out: torch.Tensor, batch: OpBatch, tables: FeatureTables,
               id_read: Optional[torch.Tensor]) -> List[Tuple[Pass, torch.Tensor, torch.Tensor]]:
    """Per pass, the touched rows ``[U]`` of its block and their summed gradients ``[U, D]`` fp32
    (``id_read``: ``[N]`` bool, the ids that count; None: all)."""
    plan, num_keys = tables.plan, tables.num_keys
    values, offsets = batch.values, batch.offsets
    batch_size = batch.bags_per_key(num_keys)
    if batch_size == 0 or values.shape[0] == 0:
        return []
    counts = key_counts(offsets, batch_size, num_keys)
    bag_of_ids = bag_of_id(offsets, num_keys, batch_size, values.shape[0])
    inv_lengths = inverse_lengths(plan, offsets, num_keys, batch_size)
    out = []
    for p in plan.passes:
        ids, in_pass = shifted_ids(p, values, counts)
        if id_read is not None:
            in_pass = id_read if in_pass is None else in_pass & id_read
        grads = bag_grads(p, grad_out, plan, inv_lengths, num_keys, batch_size)
        bags, per_sample_weights = bag_of_ids, batch.per_sample_weights
        if in_pass is not None:  # only rows this pass really touches
            ids, bags = ids[in_pass], bags[in_pass]
            per_sample_weights = None if per_sample_weights is None else per_sample_weights[in_pass]
        rows, sums = sum_rows_by_id(ids, bags, grads, per_sample_weights, p.num_rows, unique=True)
        out.append((p, rows, sums))
    return out


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)
