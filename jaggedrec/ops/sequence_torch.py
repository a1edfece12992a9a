"""The torch path of sequence (unpooled) embeddings: what runs on CPU, and on GPU with ``backend="torch"``.

The output is one flat tensor, feature after feature in the op's order: feature ``f``, which
reads key ``k``, holds ``[N_k, dim_f]`` rows, one per id of the key, in the KJT's order.

Instead of one ``embedding`` call per feature, neighbouring features that read neighbouring
keys through tables of one dim form a *segment*: their ids are one slice of the KJT's
values and their rows one slice of the output, so one ``index_select`` over the dim's whole
block of tables (each id shifted by its table's first row) writes them all, in place.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import torch

from jaggedrec.ops import backends, fused_torch
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import FusedStep
from jaggedrec.ops.pooled_plan import Pass, block_view
from jaggedrec.sparse.jagged_tensor import repeat_counts


class Segment(NamedTuple):
    features: Tuple[int, ...]  # consecutive features, in the op's order
    keys: Tuple[int, ...]      # their keys, consecutive and increasing
    block: Pass                # a pass of their dim: the [rows, dim] block of tables they read
    row_bases: Tuple[int, ...]  # per feature, its table's first row in the block
    table_rows: Tuple[int, ...]  # per feature, its table's rows

    @property
    def one_table(self) -> bool:
        """Every feature reads one table: ids index that table's own rows, unshifted."""
        return len(set(self.row_bases)) == 1


@functools.lru_cache(maxsize=256)
def segments(tables: FeatureTables) -> Tuple[Segment, ...]:
    """The features cut into segments (see the module docstring)."""
    plan = tables.plan
    block_of, base_of = {}, {}
    for p in plan.passes:
        for f, k in zip(p.features, p.keys):
            block_of[f], base_of[f] = p, p.key_row_base[k]
    out: List[Segment] = []
    for f in range(tables.num_features):
        last = out[-1] if out else None
        if (last is not None and tables.dims[last.features[-1]] == tables.dims[f]
                and tables.keys[f] == last.keys[-1] + 1):
            out[-1] = Segment(last.features + (f,), last.keys + (tables.keys[f],), last.block,
                              last.row_bases + (base_of[f],), last.table_rows + (tables.rows[f],))
        else:
            out.append(Segment((f,), (tables.keys[f],), block_of[f], (base_of[f],), (tables.rows[f],)))
    return tuple(out)


def output_sizes(tables: FeatureTables, key_lengths: List[int]) -> List[int]:
    """``[F]`` elements of each feature's part of the flat output."""
    return [key_lengths[k] * d for k, d in zip(tables.keys, tables.dims)]


def _key_starts(key_lengths: List[int]) -> List[int]:
    starts = [0]
    for n in key_lengths:
        starts.append(starts[-1] + n)
    return starts


def _segment_ids(seg: Segment, values: torch.Tensor, key_lengths: List[int], key_starts: List[int]):
    """The segment's ``[n]`` ids as rows of :func:`_rows_of` (its one table's, else its block's,
    shifted there); or None without ids."""
    lo, hi = key_starts[seg.keys[0]], key_starts[seg.keys[-1] + 1]
    if hi == lo:
        return None
    ids = values.narrow(0, lo, hi - lo)
    if seg.one_table:  # one table: its own rows, a narrowed block, no shift
        return ids
    bases = torch.tensor(seg.row_bases, dtype=ids.dtype, device=ids.device)
    counts = torch.tensor([key_lengths[k] for k in seg.keys], device=ids.device)
    return ids + repeat_counts(bases, counts, output_size=hi - lo)


# A segment whose features have at least this many ids each on average is served feature by
# feature: each call then reads its own table and needs no shift, where one call over the block
# shifts every id by its table's first row (a repeat_interleave and an add over all ids, ~0.15 ms
# for 80k ids on a 2-core Xeon); with fewer ids, the per-call overhead of many calls loses
# (8 tables of 330 ids: 0.14 ms per feature against 0.07 for one call).
_PER_FEATURE_MIN_IDS = 8192


def _split(seg: Segment, key_lengths: List[int]) -> List[Segment]:
    """``seg``, or one segment per feature when its tables differ and its features are long."""
    if seg.one_table or sum(key_lengths[k] for k in seg.keys) < _PER_FEATURE_MIN_IDS * len(seg.keys):
        return [seg]
    return [Segment((f,), (k,), seg.block, (base,), (rows,))
            for f, k, base, rows in zip(seg.features, seg.keys, seg.row_bases, seg.table_rows)]


def _walk(tables: FeatureTables, values: torch.Tensor, key_lengths: List[int]):
    """Per segment with ids: the segment, its shifted ids, and its first output element."""
    key_starts = _key_starts(key_lengths)
    sizes = output_sizes(tables, key_lengths)
    position = 0
    for whole in segments(tables):
        for seg in _split(whole, key_lengths):
            ids = _segment_ids(seg, values, key_lengths, key_starts)
            if ids is not None:
                yield seg, ids, position
            position += sum(sizes[f] for f in seg.features)


def _rows_of(flat: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The ``[rows, dim]`` rows that a segment's ids index (its one table's, else its block's),
    of the flat weights or of anything laid out as they are (a gradient)."""
    block = block_view(flat, seg.block)
    return block.narrow(0, seg.row_bases[0], seg.table_rows[0]) if seg.one_table else block


def _block_ids(seg: Segment, ids: torch.Tensor) -> torch.Tensor:
    """A segment's ids as rows of its whole block."""
    return ids + seg.row_bases[0] if seg.one_table and seg.row_bases[0] else ids


def sequence_forward(weights: torch.Tensor, values: torch.Tensor, tables: FeatureTables,
                     key_lengths: List[int]) -> torch.Tensor:
    """``[sum_f N_{key(f)} * dim_f]`` rows in the weights' dtype (layout: the module docstring)."""
    out = weights.new_empty(sum(output_sizes(tables, key_lengths)))
    for seg, ids, position in _walk(tables, values, key_lengths):
        dim = seg.block.dim
        torch.index_select(_rows_of(weights, seg), 0, ids, out=out.narrow(0, position, ids.shape[0] * dim)
                           .view(-1, dim))
    return out


def _segment_grads(grad_out: torch.Tensor, seg: Segment, ids: torch.Tensor, position: int) -> torch.Tensor:
    return grad_out.narrow(0, position, ids.shape[0] * seg.block.dim).view(-1, seg.block.dim).float()


def sequence_backward(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, tables: FeatureTables,
                      key_lengths: List[int]) -> torch.Tensor:
    """``[W]`` dense weight gradient in the weights' dtype, summed in fp32."""
    grad = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
    for seg, ids, position in _walk(tables, values, key_lengths):
        _rows_of(grad, seg).index_add_(0, ids.long(), _segment_grads(grad_out, seg, ids, position))
    return grad if weights.dtype == torch.float32 else grad.to(weights.dtype)


def sequence_sparse_grad(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor,
                         tables: FeatureTables, key_lengths: List[int]) -> torch.Tensor:
    """``[W]`` sparse COO gradient over the touched rows' elements, coalesced."""
    index_parts, value_parts = [], []
    for seg, ids, position in _walk(tables, values, key_lengths):
        first = seg.block.weight_start + _block_ids(seg, ids).long() * seg.block.dim
        index_parts.append((first.unsqueeze(1) + torch.arange(seg.block.dim, device=first.device)).reshape(-1))
        value_parts.append(_segment_grads(grad_out, seg, ids, position).reshape(-1))
    if not index_parts:
        return torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=weights.device),
                                       weights.new_empty(0), weights.shape)
    return torch.sparse_coo_tensor(torch.cat(index_parts).unsqueeze(0), torch.cat(value_parts).to(weights.dtype),
                                   weights.shape, check_invariants=False).coalesce()


def sequence_fused_update(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor,
                          tables: FeatureTables, key_lengths: List[int], fused: FusedStep) -> None:
    """One optimizer step on the rows this batch read, in place. Each dim block's ids are
    stepped together, so that a row read by two features gets one step with the summed gradient."""
    fused.step.add_(1)
    by_block: dict = {}
    for seg, ids, position in _walk(tables, values, key_lengths):
        entry = by_block.setdefault(seg.block.weight_start, (seg, [], []))
        entry[1].append(_block_ids(seg, ids))
        entry[2].append(_segment_grads(grad_out, seg, ids, position))
    eager = backends.host_readable(values, grad_out)
    for seg, ids, grads in by_block.values():
        ids, grads = (t[0] if len(t) == 1 else torch.cat(t) for t in (ids, grads))
        block = block_view(weights, seg.block)
        states = fused_torch.state_views(fused, seg.block, tables.row_bases[seg.features[0]] - seg.row_bases[0])
        rows_of_grads = torch.arange(ids.shape[0], device=ids.device)
        if eager:
            rule = fused_torch.StepRule(fused.optimizer, fused.hparams.tolist(), int(fused.step))
            fused_torch.update_touched_rows(block, states, ids, rows_of_grads, grads, None, rule)
        else:
            fused_torch.update_runs_static(block, states, ids, rows_of_grads, grads, None,
                                           torch.ones_like(ids, dtype=torch.bool),
                                           fused_torch.StepRule(fused.optimizer, fused.hparams, fused.step))

