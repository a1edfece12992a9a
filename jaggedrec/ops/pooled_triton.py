"""The Triton path of pooled embedding bags: what runs on CUDA (and, interpreted, on CPU).

Forward is one launch over every feature (two for batches of about one id per bag, which go
to the pipelined short-bag kernel and its pass for the few longer bags). Backward lists the (feature, id) contributions
and sorts them into runs with five index kernels around a sort and two cumsums, never reading
device data on the host (each contribution's gradient row and factor are worked out in one
of them, see ``_bag_rows``), then launches the row-gradient kernel: sorted and deterministic
by default, or with atomics. See ``runs_triton`` for the contributions and
``kernels/row_runs.py`` for the runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from jaggedrec.kernels import legacy_loops, pooled_bwd, pooled_fwd, pooled_fwd_short

from jaggedrec.ops import runs_triton
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import FusedStep, OpBatch


def triton_forward(weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                   position_weights: Optional[torch.Tensor] = None,
                   position_meta: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``[B, total_dim]`` fp32 pooled output and ``[F]`` int64 counts of bad ids (skipped).
    With inverse indices (``[F, B]``, VBE) each output row reads its bag slot through them.
    With ``position_weights`` (``[P]``) and ``position_meta`` (``[F, 2]`` base, length per
    feature) each id is weighted by its position in its bag, read inside the pooling loop
    (``batch.per_sample_weights`` None; not under LEGACY_LOOPS, whose loop has no such read)."""
    slots = batch.bags_per_key(tables.num_keys)
    inverse_indices = batch.inverse_indices
    batch_size = slots if inverse_indices is None else inverse_indices.shape[1]
    out = torch.empty((batch_size, tables.plan.out_offsets[-1]), dtype=torch.float32, device=weights.device)
    bad_ids = torch.zeros(tables.num_features, dtype=torch.int64, device=weights.device)
    meta, max_dim, num_bags = tables.meta(weights), max(tables.dims), tables.num_keys * slots
    short = 0 if position_weights is not None else short_length(batch.num_ids, num_bags, max_dim)
    if short:
        pooled_fwd_short.pooled_fwd_short(weights, batch, meta, out, bad_ids, max_dim, tables.plan.alignment, slots,
                                          short)
    else:
        pooled_fwd.pooled_fwd(weights, batch, meta, out, bad_ids, max_dim, tables.plan.alignment, slots,
                              position_weights, position_meta)
    return out, bad_ids


def short_length(num_ids, num_bags, max_dim: int) -> int:
    """The ids per bag the short-bag kernel pipelines (``SHORT``: 1 where bags hold at most one
    id on average, 2 where at most two; see ``kernels/pooled_fwd_short.py``), or 0 for the
    general kernel (longer bags, dims past one tile, LEGACY_LOOPS, JAGGEDREC_SHORT_BAGS=0). Decided from sizes alone;
    where a size is a symbol of a compiled graph, a bound counts only if it holds for every
    value the symbol may take (no guard, no recompile)."""
    if legacy_loops.enabled() or not pooled_fwd_short.enabled() or max_dim > pooled_fwd_short.MAX_DIM or not statically_known_true(num_bags > 0):
        return 0
    if statically_known_true(num_ids <= num_bags):
        return 1
    return 2 if statically_known_true(num_ids <= 2 * num_bags) else 0


def _bag_rows(grad_out: torch.Tensor, batch: OpBatch, tables: FeatureTables,
              meta: torch.Tensor) -> runs_triton.BagRows:
    """A contribution's gradient row is its bag's row of the ``[B, total_dim]`` output
    gradient, scaled by its per-sample weight and, under MEAN, by 1/length (worked out inside
    ``run_index``'s marks kernel)."""
    return runs_triton.BagRows(batch.offsets, batch.per_sample_weights, meta, any(tables.pooling),
                               batch.bags_per_key(tables.num_keys), grad_out.stride(0))


def _runs(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, parts: runs_triton.Contributions,
          tables: FeatureTables, meta: torch.Tensor):
    return runs_triton.sorted_runs(parts, weights, _bag_rows(grad_out, batch, tables, meta))


def triton_backward(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                    need_weight_grad: bool, need_psw_grad: bool,
                    deterministic: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Dense ``[W]`` weight gradient (weights' dtype) and ``[N]`` fp32 per-sample-weight gradient."""
    grad_out = grad_out.contiguous().float()
    meta = tables.meta(weights)
    max_dim, alignment = max(tables.dims), tables.plan.alignment
    parts = runs_triton.contributions(batch, tables, meta)
    grad_weights = grad_psw = None
    if need_weight_grad:
        if deterministic:
            runs = _runs(grad_out, weights, batch, parts, tables, meta)
            grad_weights = runs_triton.dense_grad(grad_out, runs, weights, tables, meta)
        else:
            dest = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
            pooled_bwd.rows_grad_atomic(grad_out, parts, batch, meta, dest, max_dim, alignment)
            grad_weights = dest if weights.dtype == torch.float32 else dest.to(weights.dtype)
    if need_psw_grad:
        per_contribution = torch.empty(parts.rows.shape[0], dtype=torch.float32, device=weights.device)
        pooled_bwd.psw_grad(grad_out, weights, parts, batch, meta, per_contribution, max_dim, alignment)
        grad_psw = per_contribution.view(len(tables.plan.passes), batch.num_ids).sum(0)
    return grad_weights, grad_psw


def triton_sparse_grad(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch,
                       tables: FeatureTables) -> torch.Tensor:
    """``[W]`` sparse COO gradient over the touched rows' elements (eager: sizes the output on the
    host); ``grad_out`` has one row per bag slot, and VBE bags no sample reads touch nothing."""
    grad_out = grad_out.contiguous().float()
    meta = tables.meta(weights)
    parts = runs_triton.contributions(batch, tables, meta)
    runs = _runs(grad_out, weights, batch, parts, tables, meta)
    return runs_triton.sparse_grad(grad_out, runs, weights, tables, meta)


def triton_fused_update(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                        fused: FusedStep) -> None:
    """The fused optimizer step on the rows this batch read (see ``runs_triton.fused_update``);
    ``grad_out`` has one row per bag slot, and VBE bags no sample reads are not stepped."""
    grad_out = grad_out.contiguous().float()
    meta = tables.meta(weights)
    parts = runs_triton.contributions(batch, tables, meta)
    runs = _runs(grad_out, weights, batch, parts, tables, meta)
    runs_triton.fused_update(grad_out, runs, weights, tables, meta, fused)
