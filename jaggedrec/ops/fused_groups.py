"""Eager CPU: which rows of which tables a batch steps, in independent pieces of work.

A dim block's tables are cut into groups (:func:`_table_groups`), each one piece of work for
``host_tasks``: tables own disjoint rows and state, so the pieces run on any thread in any
order with the same bits. A group gathers the ids every feature reading its tables read, the
bag (row of a bag-gradient matrix) each was read in, and their per-sample weights, then steps
its rows with ``fused_rows.update_touched_rows``.
"""

from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from jaggedrec.ops import backends
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.fused_rows import state_views, update_touched_rows
from jaggedrec.ops.fused_rules import StepRule
from jaggedrec.ops.host_tasks import run_pieces
from jaggedrec.ops.op_args import FusedStep, OpBatch
from jaggedrec.ops.pooled_plan import Pass, PooledPlan, block_view
from jaggedrec.sparse.jagged_tensor import repeat_counts


class _TableGroup(NamedTuple):
    """Tables of one dim block, rows ``first_row:first_row + num_rows`` of the block, that one
    piece of work steps; ``reads``: ``(key, feature, first row of the feature's table in the
    block, MEAN pooling)`` for every feature that reads one of them."""

    first_row: int
    num_rows: int
    reads: Tuple[Tuple[int, int, int, bool], ...]


# Eager CPU: tables are stepped a group at a time, one group per piece of work (host_tasks);
# small tables join their neighbours until a group holds this many ids, so that a model of
# many small tables is not stepped in thousands of pieces.
_GROUP_MIN_IDS = 1 << 15


def _table_groups(passes: List[Pass], plan: PooledPlan, starts: List[int]) -> List[_TableGroup]:
    """The dim block's tables, in row order, in groups of at least ``_GROUP_MIN_IDS`` ids (a
    table read by several features goes whole into one group, with all of its reads)."""
    by_first_row: Dict[int, list] = {}  # first row of a table in the block -> [rows, reads]
    for p in passes:
        for f, k, mean in zip(p.features, p.keys, p.mean):
            entry = by_first_row.setdefault(p.key_row_base[k], [plan.feature_rows[f], []])
            entry[1].append((k, f, p.key_row_base[k], mean))
    groups, current, ids = [], [], 0
    for first in sorted(by_first_row):
        current.append(first)
        ids += sum(starts[k + 1] - starts[k] for k, _, _, _ in by_first_row[first][1])
        if ids >= _GROUP_MIN_IDS:
            groups.append(current)
            current, ids = [], 0
    if current:
        groups.append(current)
    return [_TableGroup(m[0], m[-1] + by_first_row[m[-1]][0] - m[0],
                        tuple(r for t in m for r in by_first_row[t][1])) for m in groups]


class _GroupInputs(NamedTuple):
    """What every group's piece of work reads (eager CPU)."""

    grad_out: torch.Tensor        # [B, total_dim] fp32
    batch: OpBatch
    key_starts: List[int]         # [K+1] first id of each key
    id_read: Optional[torch.Tensor]  # [N] bool, the ids to step; None: all
    out_offsets: Tuple[int, ...]  # [F+1] each feature's first output column
    batch_size: int
    rule: StepRule


def update_by_table_group(grad_out, weights, batch: OpBatch, tables: FeatureTables,
                           passes_by_dim: Dict[int, List[Pass]], fused: FusedStep,
                           id_read: Optional[torch.Tensor]) -> None:
    """Eager CPU: each group of tables (:func:`_table_groups`) is one piece of work for
    ``host_tasks``; tables own disjoint rows and state, so the pieces are independent, and each
    runs on one thread, in one order, whatever the thread count."""
    plan = tables.plan
    batch_size = batch.bags_per_key(tables.num_keys)
    rule = StepRule(fused.optimizer, fused.hparams.tolist(), int(fused.step))
    row_bases = tables.row_bases
    starts = batch.offsets[::batch_size].tolist()  # [K+1] first id of each key
    shared = _GroupInputs(grad_out, batch, starts, id_read, plan.out_offsets, batch_size, rule)
    pieces = []
    for passes in passes_by_dim.values():
        p0 = passes[0]
        block = block_view(weights, p0)
        states = state_views(fused, p0, row_bases[p0.features[0]] - p0.key_row_base[p0.keys[0]])
        pieces += [functools.partial(_update_table_group, group, block, states, shared)
                   for group in _table_groups(passes, plan, starts)]
    run_pieces(pieces)


def _update_table_group(group: _TableGroup, block: torch.Tensor, states, shared: _GroupInputs) -> None:
    """Step one group of tables (one piece of work): its ids, each one's bag among the
    group's ``[reads*B, D]`` bag gradients (a copy of the features' columns of ``grad_out``,
    small enough to stay in the core's cache while runs of ids gather from it; with few ids
    per bag, ``grad_out`` itself, see :func:`_bag_rows_in_place`) and weight, then
    :func:`update_touched_rows` on the group's rows."""
    values, offsets = shared.batch.values, shared.batch.offsets
    starts, batch_size, out_offsets = shared.key_starts, shared.batch_size, shared.out_offsets
    in_place = _bag_rows_in_place(group, shared, block.shape[1])
    ids, bags, grads, psw, keep = [], [], [], [], []
    for r, (k, f, table_row, mean) in enumerate(group.reads):
        lo, hi = starts[k], starts[k + 1]
        ids.append(values[lo:hi] + (table_row - group.first_row))
        lengths = offsets[k * batch_size + 1:(k + 1) * batch_size + 1] - offsets[k * batch_size:(k + 1) * batch_size]
        if in_place:  # sample b's gradient of feature f: row b * per_sample + first of grad_out's rows
            per_sample, first = in_place[0], out_offsets[f] // block.shape[1]
            first_bags = backends.host_arange(batch_size, torch.int32) * per_sample + first
        else:
            columns = shared.grad_out[:, out_offsets[f]:out_offsets[f + 1]]
            # MEAN: the bag's gradient shared out by 1/length, as in the forward
            grads.append(columns * (1.0 / lengths.clamp(min=1).to(torch.float32)).unsqueeze(1) if mean else columns)
            first_bags = backends.host_arange(batch_size, torch.int32) + r * batch_size
        bags.append(repeat_counts(first_bags, lengths.long(), output_size=hi - lo))
        if shared.batch.per_sample_weights is not None:
            psw.append(shared.batch.per_sample_weights[lo:hi])
        if shared.id_read is not None:
            keep.append(shared.id_read[lo:hi])
    if in_place:
        grads = [in_place[1]]
    ids, bags = (t[0] if len(t) == 1 else torch.cat(t) for t in (ids, bags))
    grads = grads[0].contiguous() if len(grads) == 1 else torch.cat(grads)
    per_sample_weights = None if not psw else (psw[0] if len(psw) == 1 else torch.cat(psw)).float()
    if keep:  # VBE: only the ids of bags that some sample reads
        read = keep[0] if len(keep) == 1 else torch.cat(keep)
        ids, bags = ids[read], bags[read]
        per_sample_weights = None if per_sample_weights is None else per_sample_weights[read]
    if ids.shape[0] == 0:
        return
    rows = slice(group.first_row, group.first_row + group.num_rows)
    update_touched_rows(block[rows], tuple(None if s is None else s[rows] for s in states), ids, bags, grads,
                        per_sample_weights, shared.rule)


# With at most this many ids per bag, a group's ids read their bag gradients in grad_out as
# they lie there: the copy of the group's columns (a write and a read back of [reads*B, D])
# pays only where each bag gradient is read several times. dlrm preset at 1 id per bag (26
# tables of 100k x 64, batch 4096), 8 tables a group: the copy cost 1.5 ms of a group's
# ~9 ms of update (thread CPU time, loaded 2-core Xeon).
_IN_PLACE_MAX_IDS_PER_BAG = 2


def _bag_rows_in_place(group: _TableGroup, shared: _GroupInputs, dim: int):
    """``(rows per sample, grad_out viewed as [B * rows per sample, dim])`` where the group's
    ids may read their bag gradients in ``grad_out`` itself, else None: few ids per bag, no
    MEAN (its 1/length is applied to a copy), and ``grad_out``'s columns falling into whole
    rows of ``dim``."""
    grad_out, batch_size = shared.grad_out, shared.batch_size
    num_ids = sum(shared.key_starts[k + 1] - shared.key_starts[k] for k, _, _, _ in group.reads)
    if num_ids > _IN_PLACE_MAX_IDS_PER_BAG * batch_size * len(group.reads) or any(m for _, _, _, m in group.reads):
        return None
    width = grad_out.shape[1]
    if not grad_out.is_contiguous() or width % dim or any(shared.out_offsets[f] % dim for _, f, _, _ in group.reads):
        return None
    if grad_out.shape[0] * (width // dim) >= 2**31:  # int32 bag numbers
        return None
    return width // dim, grad_out.view(-1, dim)
