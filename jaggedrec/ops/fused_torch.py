"""The torch path of the fused optimizer step: update touched rows in the backward.

For each block of equal-dim tables, every id read by any pass is gathered into one list,
so that a row read by two features (one table, two keys) still gets one update with the
summed gradient. The ids are sorted into runs (``runs_torch``), each row's gradient is summed
with one ``embedding_bag`` over the output gradient, and the optimizer runs on those rows
only, with vectorised index ops: no loop over rows or tables. Eagerly, the rows are stepped a
cache-sized chunk at a time: a chunk where many rows were touched is streamed whole, in
order, and elsewhere only the touched rows are gathered and written back. Off CPU (the
torch backend on a GPU, where reading sizes to the host would stall it, and in compiled
graphs there), one slot per id stands in for the touched rows with static shapes (see
:func:`update_runs_static`); on CPU even a compiled graph calls the eager update, through an
op that torch.compile does not trace into (``ops/pooled.py``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from jaggedrec.ops import backends, vbe
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.fused_rules import (ADAM, ADAM_DECOUPLED, EXACT_ADAGRAD, EXACT_ADAGRAD_DECOUPLED, LAMB, LARS_SGD,
                                       PARTIAL_ROWWISE_ADAM, PARTIAL_ROWWISE_LAMB, ROWWISE_ADAGRAD,
                                       ROWWISE_ADAGRAD_COUNTER, ROWWISE_ADAGRAD_DECOUPLED, SGD, STATE_LAYOUT, StepRule,
                                       step_in_place, step_rows)
from jaggedrec.ops.fused_rules import scaled_gradient
from jaggedrec.ops.host_tasks import run_pieces
from jaggedrec.ops.op_args import FusedStep, OpBatch
from jaggedrec.ops.pooled_plan import (Pass, PooledPlan, bag_grads, bag_of_id, block_view, inverse_lengths,
                                       key_counts, shifted_ids)
from jaggedrec.ops.runs_torch import RowRuns, row_runs, run_starts, sort_rows


def fused_update(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                 fused: FusedStep) -> None:
    """Apply ``fused.optimizer`` to the rows of ``weights`` that this batch read, in place.

    Args:
        grad_out: ``[B', total_dim]`` gradient of the pooled output, one row per bag slot.
        weights, batch, tables: as in the forward; VBE inverse indices only say which bags
            some sample read: the ids of the others are not stepped.
        fused: the optimizer (see ``kernels/pooled_fused.py``), its ``[5]`` hyper-parameters,
            the ``[1]`` step count (incremented here) and its state (updated).
    """
    id_read = vbe.ids_read(batch.inverse_indices, tables, batch.offsets, batch.num_ids)
    fused.step.add_(1)
    plan = tables.plan
    # statically_known_true: in a compiled graph the id count may be unbacked; the general
    # path below serves an empty batch too
    if statically_known_true(batch.bags_per_key(tables.num_keys) == 0) or statically_known_true(batch.num_ids == 0):
        return
    grad_out = grad_out.float()
    passes_by_dim: Dict[int, List[Pass]] = {}
    for p in plan.passes:
        passes_by_dim.setdefault(p.dim, []).append(p)
    if backends.host_readable(batch.values, batch.offsets):
        _update_by_table_group(grad_out, weights, batch, tables, passes_by_dim, fused, id_read)
    else:
        _update_static(grad_out, weights, batch, tables, passes_by_dim, fused, id_read)


def _update_static(grad_out, weights, batch: OpBatch, tables: FeatureTables, passes_by_dim: Dict[int, List[Pass]],
                   fused: FusedStep, id_read: Optional[torch.Tensor]) -> None:
    """Off CPU: each dim block's ids, every pass's, in one list of static size; ids of keys
    outside their pass, or of bags no sample reads, are masked (they weigh nothing and touch
    nothing), then :func:`update_runs_static`."""
    plan, num_keys = tables.plan, tables.num_keys
    values, offsets = batch.values, batch.offsets
    batch_size = batch.bags_per_key(num_keys)
    rule = StepRule(fused.optimizer, fused.hparams, fused.step)
    row_bases = tables.row_bases
    inv_lengths = inverse_lengths(plan, offsets, num_keys, batch_size)
    counts = key_counts(offsets, batch_size, num_keys)
    bag_of_ids = bag_of_id(offsets, num_keys, batch_size, values.shape[0])
    for passes in passes_by_dim.values():
        ids, bags, psw, grads, live = [], [], [], [], []
        for j, p in enumerate(passes):
            pass_ids, in_pass = shifted_ids(p, values, counts)
            if id_read is not None:
                in_pass = id_read if in_pass is None else in_pass & id_read
            pass_bags, pass_psw = bag_of_ids + j * num_keys * batch_size, batch.per_sample_weights
            if in_pass is not None:  # static shapes: masked ids weigh nothing and touch nothing
                pass_psw = in_pass.float() if pass_psw is None else pass_psw * in_pass
            ids.append(pass_ids)
            bags.append(pass_bags)
            psw.append(pass_psw)
            grads.append(bag_grads(p, grad_out, plan, inv_lengths, num_keys, batch_size))
            live.append(torch.ones_like(pass_ids, dtype=torch.bool) if in_pass is None else in_pass)
        per_sample_weights = None if all(w is None for w in psw) else torch.cat(
            [torch.ones_like(i, dtype=torch.float32) if w is None else w.float() for i, w in zip(ids, psw)])
        all_ids, all_bags, all_grads = (t[0] if len(t) == 1 else torch.cat(t) for t in (ids, bags, grads))
        p0 = passes[0]
        states = state_views(fused, p0, row_bases[p0.features[0]] - p0.key_row_base[p0.keys[0]])
        update_runs_static(block_view(weights, p0), states, all_ids, all_bags, all_grads, per_sample_weights,
                           torch.cat(live), rule)


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


def _update_by_table_group(grad_out, weights, batch: OpBatch, tables: FeatureTables,
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
        bags.append(torch.repeat_interleave(first_bags, lengths.long(), output_size=hi - lo))
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


# Bytes of rows per chunk in the eager update: a chunk's rows, sums and temporaries stay
# in the cores' L2 between the sums, the arithmetic and the write back. On a 2-core EPYC
# (1 MB L2 each) at dim 64, 2 MB chunks stepped ~10% faster than 8 MB ones and no slower
# than 1 MB ones, where the per-chunk Python overhead starts to show.
_CHUNK_BYTES = 2 << 20
# Scattered rows: a chunk's rows, their state rows and sums are gathered and written back
# apart, so all of them should stay in L2 (2 MB a core on the Xeon) from gather to write
# back. dlrm preset at 1 id per bag, 1 thread, thread CPU time, loaded Xeon (load ~14):
# exact Adagrad's update 47.7 / 44.2 / 43.3 ms with 2 MB / 1 MB / 512 kB chunks, SGD 19.8 /
# 18.4 / 18.8.
_SCATTERED_CHUNK_BYTES = 1 << 20

# With at least this fraction of a block's rows touched, the rows are stepped whole, a chunk
# at a time, read and written in order, untouched ones left as they were; with fewer, only
# the touched rows are gathered and written back. In order, a table streams at ~50 GB/s on a
# 2-core EPYC; scattered rows were gathered at ~9 GB/s and written back at ~6, so at dim 64
# a touched row costs as much as ~6-10 streamed ones, but streaming also does the optimizer's
# math for every row. 26 x 100k x 64, batch 4096, uniform ids, streamed vs scattered step:
#   SGD:              34% touched 96 vs 112 ms, 56% 126 vs 155; zipf-like, 22%: ~10% slower
#   row-wise Adagrad: 34% touched 138 vs 117 ms, 56% 170 vs 187
#   Adam:             34% touched 366 vs 262 ms, 56% 364 vs 391
# The thresholds sit near the break-even points those imply (linear in between).
# SGD, row-wise and exact Adagrad (without weight decay) add their steps into scattered rows
# with one sparse add (fused_rules.scaled_gradient), no gather and write-back; dlrm preset on
# a 2-core Xeon, thread CPU time at 1 thread, loaded machine, streamed vs scattered step:
#   SGD:              56% touched 344 vs 338 ms, 87% 541 vs 613
#   row-wise Adagrad: 56% 542 vs 430 ms
#   exact Adagrad:    56% 945 vs 665 ms
_STREAM_MIN_TOUCHED = {SGD: 1 / 2, ROWWISE_ADAGRAD: 3 / 4, ADAM: 1 / 2, EXACT_ADAGRAD: 3 / 4, LARS_SGD: 1 / 2,
                       PARTIAL_ROWWISE_ADAM: 1 / 2, LAMB: 1 / 2, PARTIAL_ROWWISE_LAMB: 1 / 2,
                       ROWWISE_ADAGRAD_DECOUPLED: 1 / 2, ROWWISE_ADAGRAD_COUNTER: 1 / 2, ADAM_DECOUPLED: 1 / 2,
                       EXACT_ADAGRAD_DECOUPLED: 1 / 2}
# Plain SGD streamed as one sparse product (_add_run_sums) is a single pass over the rows, and
# streams from this share of its threshold: same machine, load ~14, backward streamed vs
# scattered: 18% of rows touched (5 ids per bag) 98 vs 85 ms, 33% (10) 116 vs 146.
_ONE_PASS_SHARE = 1 / 2


def update_touched_rows(block: torch.Tensor, states, ids: torch.Tensor, bags: torch.Tensor, grads: torch.Tensor,
                        per_sample_weights: Optional[torch.Tensor], rule: StepRule) -> None:
    """Eager: sort the ids into runs of equal rows, then per chunk of rows sum each row's
    gradient (one ``embedding_bag`` over ``grads``), step the rows and write them back.

    Args:
        block: ``[R, D]`` the weights of one dim block; ``states`` its optimizer state views.
        ids, bags: ``[N]`` block row and bag (row of ``grads``) of each id.
        grads: ``[B*K, D]`` fp32 bag gradients; ``per_sample_weights``: ``[N]`` fp32 or None.
        rule: the step, its hyper-parameters read to the host.
    """
    num_rows, dim = block.shape
    sorted_ids, order = sort_rows(ids, num_rows)
    alpha = _plain_sgd_alpha(rule, block, grads)
    min_touched = _STREAM_MIN_TOUCHED[rule.optimizer] * (1 if alpha is None else _ONE_PASS_SHARE)
    stream = int((sorted_ids[1:] != sorted_ids[:-1]).sum()) + 1 >= num_rows * min_touched
    rows_per_chunk = max(1, (_CHUNK_BYTES if stream else _SCATTERED_CHUNK_BYTES) // (dim * 4))
    # streamed, one run per row (empty for untouched rows): a chunk of runs is a range of rows
    runs = row_runs(sorted_ids, order, bags, per_sample_weights, num_rows, unique=not stream)
    # in the bags' dtype once, not converted by every chunk's embedding_bag
    run_offsets = runs.run_offsets.to(runs.bags.dtype)
    if stream and alpha is not None:
        _add_run_sums(block, run_offsets, runs, grads, alpha)
        return
    num_runs = run_offsets.shape[0] - 1
    chunk_starts = list(range(0, num_runs, rows_per_chunk)) + [num_runs]
    first_ids = run_offsets[chunk_starts].tolist()
    for lo, hi, a, b in zip(chunk_starts, chunk_starts[1:], first_ids, first_ids[1:]):
        if a == b:
            continue
        sums = F.embedding_bag(runs.bags[a:b], grads, run_offsets[lo:hi + 1] - a, mode="sum", include_last_offset=True,
                               per_sample_weights=None if runs.per_sample_weights is None
                               else runs.per_sample_weights[a:b])  # [hi-lo, D]
        if stream:
            # (SGD with max_norm too: untouched rows must not be renormalised)
            touched = (run_offsets[lo + 1:hi + 1] > run_offsets[lo:hi]
                       if rule.optimizer != SGD or len(rule.hparams) > 6 else None)
            _step_row_range(block, states, lo, hi, sums, touched, rule)
        else:
            _step_scattered_rows(block, states, runs.rows[lo:hi].long(), sums, rule)


# MKL's sparse-times-dense product, where torch has it: sums each row's run of bag gradients
# and adds it into the row in one pass over the rows. It must round as the chunked sums and
# add do (streamed and scattered steps agree bit for bit); MKL picks its kernel by shape, and
# on a Sapphire Rapids Xeon dims 4, 8, 16 and 24 rounded otherwise, so each dim is checked once
# (:func:`_run_sums_round_alike`) and falls back where it differs.
_CSR_ADD = torch.backends.mkl.is_available()
if _CSR_ADD:
    with warnings.catch_warnings():  # torch warns once that sparse CSR tensors are in beta
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                torch.zeros(0), (1, 1), check_invariants=False)


def _plain_sgd_alpha(rule: StepRule, block: torch.Tensor, grads: torch.Tensor) -> Optional[float]:
    """``-lr`` where the step is plain SGD on fp32 rows and :func:`_add_run_sums` can make it,
    else None."""
    if not _CSR_ADD or rule.optimizer != SGD or block.dtype != torch.float32 or not grads.is_contiguous():
        return None
    alpha = scaled_gradient(rule, None, None)  # SGD: -lr, reading no gradient; None with options
    return alpha if alpha is not None and _run_sums_round_alike(block.shape[1]) else None


@functools.lru_cache(maxsize=None)
def _run_sums_round_alike(dim: int) -> bool:
    """Whether, at this dim, :func:`_add_run_sums` gives the bits of ``embedding_bag`` sums
    added with ``w.add_(sums, alpha)``, with and without per-id weights, on seeded data."""
    gen = torch.Generator().manual_seed(dim)
    rows, num_bags, n = 96, 64, 600
    sorted_ids = torch.sort(torch.randint(0, rows, (n,), generator=gen, dtype=torch.int32)).values
    run_offsets = F.pad(torch.bincount(sorted_ids, minlength=rows).cumsum(0), (1, 0)).to(torch.int32)
    bags = torch.randint(0, num_bags, (n,), generator=gen, dtype=torch.int32)
    grads = torch.randn(num_bags, dim, generator=gen)
    block = torch.randn(rows, dim, generator=gen)
    for weights in (None, torch.rand(n, generator=gen)):
        sums = F.embedding_bag(bags, grads, run_offsets, mode="sum", include_last_offset=True,
                               per_sample_weights=weights)
        in_one_pass = block.clone()
        _add_run_sums(in_one_pass, run_offsets, RowRuns(None, run_offsets, bags, weights), grads, -0.37)
        if not torch.equal(in_one_pass, block.clone().add_(sums, alpha=-0.37)):
            return False
    return True


def _add_run_sums(block, run_offsets, runs: RowRuns, grads, alpha: float) -> None:
    """Streamed plain SGD: every row ``r`` of ``block`` (``[R, D]``) gets ``alpha *
    sum(grads[runs.bags[i]] * weight[i])`` over its run ``i`` in ``run_offsets[r]:
    run_offsets[r+1]`` (``[R+1]``), as one product of a ``[R, B]`` sparse matrix (a row per
    table row, the run's bags as its columns) with ``grads`` (``[B, D]``), added in place. The
    chunked sums and add it replaces wrote and read back every row's sum, and read and wrote
    every row of the block: dlrm preset at 20 ids per bag (56% of rows touched), 1 thread,
    2-core Xeon at load ~14: the update 185 -> 130 ms a step, thread CPU time."""
    weights = runs.per_sample_weights
    if weights is None:
        weights = torch.ones(runs.bags.shape[0], dtype=torch.float32)
    runs_matrix = torch.sparse_csr_tensor(run_offsets, runs.bags, weights, (block.shape[0], grads.shape[0]),
                                          check_invariants=False)
    block.addmm_(runs_matrix, grads, alpha=alpha)


def _step_scattered_rows(block, states, rows, sums, rule: StepRule) -> None:
    """Step rows ``rows`` (``[U]``, distinct, ascending) with summed gradients ``sums``
    (``[U, D]``, consumed). Where the step is ``w += alpha * g'`` (:func:`scaled_gradient`),
    ``g'`` is added into the rows where they lie, one sparse add (a row's axpy per touched row):
    a third of the time of gathering the rows and writing them back, which the other steps do."""
    current = [None if s is None else s.index_select(0, rows) for s in states]
    alpha = scaled_gradient(rule, sums, current[0]) if _all_fp32(block, *states) else None
    if alpha is not None:
        for dest, value in zip(states, current):
            if dest is not None:
                dest.index_copy_(0, rows, value)
        # read the rows first with embedding_bag's gather, which keeps many rows in flight (one
        # bag: it writes one row); the add's row-by-row axpy then finds them in cache. dlrm
        # preset at 1 id per bag (4% of rows touched), 26 tables after a forward, 1 thread,
        # loaded 2-core Xeon: 16.8 -> 12.7 ms of sums and adds, thread CPU time
        F.embedding_bag(rows, block, _FIRST_OFFSET, mode="sum")
        block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                           check_invariants=False), alpha=alpha)
        return
    w = block.index_select(0, rows).float()
    step_in_place(rule, w, sums, *current)
    for dest, value in zip((block, *states), (w, *current)):
        if dest is not None:
            dest.index_copy_(0, rows, value.to(dest.dtype))


_FIRST_OFFSET = torch.zeros(1, dtype=torch.int64)


def _all_fp32(*tensors) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in tensors)


def _step_row_range(block, states, lo, hi, sums, touched, rule: StepRule) -> None:
    """Step rows ``lo:hi`` in place with summed gradients ``sums`` (``[hi-lo, D]``, zero for
    untouched rows, consumed); ``touched``: ``[hi-lo]`` bool, or None for SGD, for which a
    zero gradient is no step."""
    w = block[lo:hi]
    if _all_fp32(block, *states):
        alpha = scaled_gradient(rule, sums, None if states[0] is None else states[0][lo:hi], touched)
        if alpha is not None:  # the same g' and add as the scattered rows' (bit for bit)
            w.add_(sums, alpha=alpha)
            return
    work = w if w.dtype == torch.float32 else w.float()
    step_in_place(rule, work, sums, *(None if s is None else s[lo:hi] for s in states), touched=touched)
    if work is not w:
        w.copy_(work)


def update_runs_static(block: torch.Tensor, states, ids: torch.Tensor, bags: torch.Tensor, grads: torch.Tensor,
                       per_sample_weights: Optional[torch.Tensor], live: torch.Tensor, rule: StepRule) -> None:
    """Off CPU: the same update with static shapes, over ``n`` slots for the ``n`` ids
    (the touched-row count stays on the device), touching only the rows the batch read.

    Sorted by row, the ids form runs; slot ``u`` of one ``embedding_bag`` over the runs holds
    run ``u``'s summed gradient. Every slot then steps a row and writes it back: slots past
    the live runs redo the last live run, so that duplicate writes to a row carry the same
    value and agree whatever their order. Cost follows the batch, not the tables: the
    whole-table masked update this replaced took 99 ms per compiled step at one id per bag
    (26 tables of 100k rows, eager 25 ms); now 19 ms (eager 18). At 20 ids per bag, 272 ms
    (eager 246; the masked update ~190).

    Args as in :func:`update_touched_rows`, plus ``live``: ``[N]`` bool, the ids to step;
    ``rule``'s hyper-parameters and step count stay device tensors.
    """
    num_rows, n = block.shape[0], ids.shape[0]
    device = ids.device
    # dead ids (keys outside their pass) sort last, past every row, in a run of their own
    keys = torch.where(live, ids, num_rows)
    sorted_rows, order = sort_rows(keys, num_rows)
    is_start = sorted_rows != F.pad(sorted_rows, (1, 0), value=-1)[:-1]
    positions = torch.arange(n, device=device)
    run_start = run_starts(is_start, positions)  # run u starts at run_start[u]; past the runs, n
    sorted_weights = None if per_sample_weights is None else per_sample_weights.index_select(0, order)
    sums = F.embedding_bag(bags.index_select(0, order), grads, run_start[:n + 1], mode="sum",
                           include_last_offset=True, per_sample_weights=sorted_weights)  # [n, D]
    num_live = (is_start & (sorted_rows < num_rows)).sum()
    any_live = num_live > 0  # with none, slot 0 rewrites row 0 as it is
    live_slot = positions < num_live
    last = (num_live - 1).clamp(min=0).reshape(1)
    rows = sorted_rows.index_select(0, run_start[:n].clamp(max=n - 1)).long()
    rows = torch.where(live_slot, rows, rows.index_select(0, last))
    rows = torch.where(any_live, rows, 0)
    # where, not a gather: compiled, the last live run's row broadcasts into the step's loop
    grads_of_rows = torch.where(live_slot.unsqueeze(1), sums, sums.index_select(0, last))
    w = block.index_select(0, rows).float()
    current = [None if s is None else s.index_select(0, rows) for s in states]
    new = step_rows(rule.optimizer, w, grads_of_rows, *current, rule.hparams.unbind(), rule.step.float())
    for dest, value, old in zip((block, *states), new, (w, *current)):
        if dest is not None:
            dest.index_put_((rows,), torch.where(any_live, value, old).to(dest.dtype))


def state_views(fused: FusedStep, p: Pass, block_row_base: int):
    """The optimizer state of one block of tables, indexed by the block's rows: row-wise
    ``[R]``, element-wise ``[R, D]`` (``STATE_LAYOUT``); None where the optimizer keeps none.

    Args:
        p: a pass of the block; block_row_base: the block's first row in row-wise state.
    """
    layout = STATE_LAYOUT[fused.optimizer]
    views = [s.narrow(0, block_row_base, p.num_rows) if per == "row" else block_view(s, p)
             for s, per in zip((fused.state1, fused.state2), layout)]
    return tuple(views) + (None,) * (2 - len(views))
