"""What the Triton paths of every op share: the batch's ids as *contributions*, and what the
sorted runs of contributions give (a dense or sparse weight gradient, a fused optimizer step).

A contribution is one (pass, id) pair: id ``c % N`` as read by the feature of pass ``c // N``
(a pass holds each KJT key at most once; a key read by two tables needs two passes). Each
op says where in its output gradient a contribution's gradient row lies (a bag's row for
the pooled op, the id's own row for the sequence op); everything after that is the same.
See ``kernels/row_runs.py`` for the runs.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
from torch._subclasses.fake_tensor import is_fake

from jaggedrec.kernels import pooled_fused, row_runs, run_index
from jaggedrec.kernels.common import (META_DIM, META_MEAN, META_OUT_COLUMN, META_ROWS, META_WEIGHT_OFFSET,
                                     interpreting)
from jaggedrec.kernels.pooled_bwd import Contributions

from jaggedrec.ops import vbe
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import FusedStep, OpBatch
from jaggedrec.ops.runs_torch import run_starts, sort_rows


def _pass_features(tables: FeatureTables, like: torch.Tensor) -> torch.Tensor:
    """``[P, K]`` int32: the feature that reads key k in pass p, or -1."""
    by_pass = [[-1] * tables.num_keys for _ in tables.plan.passes]
    for p, pass_ in enumerate(tables.plan.passes):
        for f, k in zip(pass_.features, pass_.keys):
            by_pass[p][k] = f
    if torch.compiler.is_compiling() or is_fake(like):
        return torch.tensor(by_pass, dtype=torch.int32, device=like.device)
    return _cached_pass_features(tuple(map(tuple, by_pass)), like.device)


@functools.lru_cache(maxsize=256)
def _cached_pass_features(by_pass, device: torch.device) -> torch.Tensor:
    return torch.tensor(by_pass, dtype=torch.int32, device=device)


def _torch_glue() -> bool:
    """The index work as torch ops (the reference the kernels of ``kernels/run_index.py`` are
    tested against): only where a graph is compiled under Triton's interpreter, which cannot
    trace a kernel launch."""
    return interpreting() and torch.compiler.is_compiling()


def contributions(batch: OpBatch, tables: FeatureTables, meta: torch.Tensor) -> Contributions:
    """Every (pass, id) pair of the batch (``[N]`` ids, ``[K*B+1]`` offsets), with no host sync.
    With VBE inverse indices, the ids of bags that no sample reads are masked: they get no
    gradient at all. One kernel (``run_index.contributions``; under VBE after a scatter over
    the ``[F, B]`` inverse indices)."""
    if _torch_glue():
        return contributions_reference(batch, tables, meta)
    values, offsets = batch.values, batch.offsets
    num_ids, num_passes = values.shape[0], len(tables.plan.passes)
    bag_read = vbe.bags_read(batch.inverse_indices, tables, offsets)
    feature = torch.empty(num_passes * num_ids, dtype=torch.int32, device=values.device)
    rows = torch.empty(num_passes * num_ids, dtype=torch.int64, device=values.device)
    bag = torch.empty(num_ids, dtype=torch.int64, device=values.device)
    run_index.contributions(values, offsets, _pass_features(tables, meta), meta, bag_read, feature, rows, bag,
                            batch.bags_per_key(tables.num_keys))
    return Contributions(feature, rows, bag)


def contributions_reference(batch: OpBatch, tables: FeatureTables, meta: torch.Tensor) -> Contributions:
    """:func:`contributions` as torch ops."""
    values, offsets = batch.values, batch.offsets
    num_ids = values.shape[0]
    num_keys = tables.num_keys
    id_read = vbe.ids_read(batch.inverse_indices, tables, offsets, num_ids)
    batch_size = batch.bags_per_key(num_keys)
    lengths = (offsets[1:] - offsets[:-1]).long()
    bag_of_value = torch.repeat_interleave(torch.arange(num_keys * batch_size, device=values.device), lengths,
                                           output_size=num_ids)
    key_of_value = torch.div(bag_of_value, batch_size, rounding_mode="floor") if batch_size else bag_of_value
    feature = _pass_features(tables, meta)[:, key_of_value].reshape(-1)  # [P*N]
    ids = values.long().repeat(len(tables.plan.passes))
    safe = feature.clamp(min=0).long()
    in_table = (feature >= 0) & (ids >= 0) & (ids < meta[safe, META_ROWS.value])
    if id_read is not None:
        in_table = in_table & id_read.repeat(len(tables.plan.passes))
    rows = torch.where(in_table, meta[safe, META_WEIGHT_OFFSET.value] + ids * meta[safe, META_DIM.value], -1)
    feature = torch.where(in_table, feature, -1).to(torch.int32)
    return Contributions(feature, rows, bag_of_value.to(torch.int64))


GradientRows = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]


class BagRows(NamedTuple):
    """What the pooled op says of its contributions, for ``run_index``'s marks kernel to work
    out in the pass it makes anyway: a contribution's gradient row is its bag's row of the
    ``[B, total_dim]`` output gradient, scaled by its per-sample weight and, under MEAN, by
    1/length."""

    offsets: torch.Tensor                        # [K*B+1] the bags' offsets
    per_sample_weights: Optional[torch.Tensor]   # [N] or None
    meta: torch.Tensor                           # [F, META_FIELDS] the features' metadata
    any_mean: bool                               # some feature pools by MEAN
    batch_size: int                              # B, bag slots per key
    row_stride: int                              # the output gradient's row stride


def bag_rows_reference(bag_rows: BagRows, parts: Contributions) -> GradientRows:
    """:class:`BagRows` as torch ops (what the marks kernel computes)."""
    num_values = parts.bag_of_value.shape[0]
    offsets, per_sample_weights, meta = bag_rows.offsets, bag_rows.per_sample_weights, bag_rows.meta

    def gradient_rows(order: torch.Tensor, feature: torch.Tensor):
        value = order % num_values
        bag = parts.bag_of_value.index_select(0, value)
        item_offset = (bag % bag_rows.batch_size) * bag_rows.row_stride + meta[feature, META_OUT_COLUMN.value]
        scale = None if per_sample_weights is None else per_sample_weights.index_select(0, value).float()
        if bag_rows.any_mean:
            lengths = (offsets[1:] - offsets[:-1]).index_select(0, bag)
            inverse = torch.where(meta[feature, META_MEAN.value] != 0, 1.0 / lengths.clamp(min=1).float(), 1.0)
            scale = inverse if scale is None else scale * inverse
        return item_offset, scale
    return gradient_rows


def sorted_runs(parts: Contributions, weights: torch.Tensor,
                gradient_rows: Union[GradientRows, BagRows]) -> row_runs.Runs:
    """The contributions sorted by row into runs (``row_runs.Runs``), with static shapes and no
    host sync; masked contributions (row -1) sort first, in no run. Torch ops: the sort and two
    cumsums; the rest is four kernels that write every entry they are read for (no fills).

    Args:
        parts: the ``[M]`` contributions.
        weights: the flat weights (their size says whether row offsets fit 32-bit sort keys).
        gradient_rows: what the op says of its contributions: the pooled op's
            :class:`BagRows` (worked out in the marks kernel), or a function given ``[M]``
            contribution indices in sorted order and ``[M]`` int64 their features (masked ones
            clamped to 0) that returns ``[M]`` int64 the element of the output gradient where
            each one's gradient row starts, and ``[M]`` fp32 its factor, or None for all 1
            (the sequence op: the id's own output row).
    """
    if _torch_glue():
        return sorted_runs_reference(parts, weights, gradient_rows)
    rows = parts.rows
    num = rows.shape[0]
    device = rows.device
    sorted_rows, order = sort_rows(rows, weights.numel())
    starts = torch.empty(num, dtype=torch.int32, device=device)
    sorted_feature = torch.empty(num, dtype=torch.int64, device=device)
    if isinstance(gradient_rows, BagRows):
        item_offset = torch.empty(num, dtype=torch.int64, device=device)
        has_scale = gradient_rows.per_sample_weights is not None or gradient_rows.any_mean
        scale = torch.empty(num, dtype=torch.float32, device=device) if has_scale else None
        run_index.run_marks(sorted_rows, order, parts.feature, starts, sorted_feature, (
            parts.bag_of_value, gradient_rows.offsets, gradient_rows.per_sample_weights, gradient_rows.meta,
            gradient_rows.any_mean, gradient_rows.batch_size, gradient_rows.row_stride, item_offset, scale))
    else:
        run_index.run_marks(sorted_rows, order, parts.feature, starts, sorted_feature)
        item_offset, scale = gradient_rows(order, sorted_feature)
    run_start = torch.empty(num + 1, dtype=torch.int64, device=device)
    run_row = torch.empty(num, dtype=torch.int64, device=device)
    run_feature = torch.empty(num, dtype=torch.int64, device=device)
    num_runs = torch.empty(1, dtype=torch.int64, device=device)
    run_index.run_layout(sorted_rows, starts, torch.cumsum(starts, 0), sorted_feature, run_start, run_row, run_feature,
                         num_runs)
    # runs of more than LONG_RUN contributions, summed by a kernel of their own (read here at
    # each call, so that a test can lower the bar)
    long_marks = torch.empty(num, dtype=torch.int32, device=device)
    run_index.long_marks(run_start, num_runs, long_marks, row_runs.LONG_RUN)
    long_rank = torch.empty(num, dtype=torch.int64, device=device)
    long_runs = torch.empty(num, dtype=torch.int64, device=device)
    num_long = torch.empty(1, dtype=torch.int64, device=device)
    run_index.long_layout(long_marks, torch.cumsum(long_marks, 0), long_rank, long_runs, num_long)
    return row_runs.Runs(num_runs, run_start, run_row, run_feature, item_offset, scale, long_rank, long_runs, num_long)


def sorted_runs_reference(parts: Contributions, weights: torch.Tensor,
                          gradient_rows: Union[GradientRows, BagRows]) -> row_runs.Runs:
    """:func:`sorted_runs` as torch ops."""
    if isinstance(gradient_rows, BagRows):
        gradient_rows = bag_rows_reference(gradient_rows, parts)
    rows = parts.rows
    num = rows.shape[0]
    sorted_rows, order = sort_rows(rows, weights.numel())
    previous = torch.nn.functional.pad(sorted_rows, (1, 0), value=-1)[:-1]
    is_start = (sorted_rows >= 0) & (sorted_rows != previous)
    positions = torch.arange(num, device=rows.device)
    run_start = run_starts(is_start, positions)
    first = run_start[:num].clamp(max=num - 1)  # past num_runs: any valid position
    sorted_feature = parts.feature.index_select(0, order).long().clamp(min=0)
    item_offset, scale = gradient_rows(order, sorted_feature)
    # runs of more than LONG_RUN contributions, summed by a kernel of their own (read here at
    # each call, so that a test can lower the bar)
    is_long = (run_start[1:num + 1] - run_start[:num]) > row_runs.LONG_RUN  # past num_runs: length 0
    long_rank = torch.where(is_long, torch.cumsum(is_long, 0) - 1, -1)
    long_runs = torch.zeros(2 * num, dtype=torch.int64, device=rows.device)
    long_runs.index_put_((torch.where(is_long, long_rank, num + positions),), positions)
    return row_runs.Runs(is_start.sum(dtype=torch.int64).reshape(1), run_start,
                         sorted_rows.index_select(0, first).long(), sorted_feature.index_select(0, first),
                         item_offset, scale, long_rank, long_runs, is_long.sum(dtype=torch.int64).reshape(1))


def dense_grad(grad_out: torch.Tensor, runs: row_runs.Runs, weights: torch.Tensor, tables: FeatureTables,
               meta: torch.Tensor) -> torch.Tensor:
    """``[W]`` weight gradient in the weights' dtype; each touched row written once, in a fixed order."""
    dest = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
    row_runs.rows_grad(grad_out, runs, meta, dest, True, max(tables.dims), tables.plan.alignment)
    return dest if weights.dtype == torch.float32 else dest.to(weights.dtype)


def sparse_grad(grad_out: torch.Tensor, runs: row_runs.Runs, weights: torch.Tensor, tables: FeatureTables,
                meta: torch.Tensor) -> torch.Tensor:
    """``[W]`` sparse COO gradient over the touched rows' elements (eager: sizes the output on the host)."""
    max_dim = max(tables.dims)
    num_rows = int(runs.num_runs)  # eager only: the sparse gradient's size depends on the data
    compact = torch.zeros((num_rows, max_dim), dtype=torch.float32, device=weights.device)
    row_runs.rows_grad(grad_out, runs, meta, compact, False, max_dim, tables.plan.alignment)
    row_dims = meta[runs.run_feature[:num_rows], META_DIM.value]
    columns = torch.arange(max_dim, device=weights.device)
    used = columns.unsqueeze(0) < row_dims.unsqueeze(1)
    indices = (runs.run_row[:num_rows].unsqueeze(1) + columns.unsqueeze(0))[used]
    return torch.sparse_coo_tensor(indices.unsqueeze(0), compact[used].to(weights.dtype), weights.shape,
                                   is_coalesced=True, check_invariants=False)


def fused_update(grad_out: torch.Tensor, runs: row_runs.Runs, weights: torch.Tensor, tables: FeatureTables,
                 meta: torch.Tensor, fused: FusedStep) -> None:
    """The fused optimizer step: one kernel sums each run's gradient and updates its row and
    the row's state in place (see ``kernels/pooled_fused.py``)."""
    fused.step.add_(1)
    pooled_fused.fused_update(grad_out, runs, meta, weights, fused, max(tables.dims), tables.plan.alignment)
