"""The Triton path of sequence (unpooled) embeddings: what runs on CUDA (and, interpreted, on CPU).

Forward is one launch over every feature (``kernels/sequence_fwd.py``). Backward reuses the
contributions and runs of the pooled op (``runs_triton``): a contribution's gradient row is
the id's own row of the flat output gradient, with no factor.
"""

from __future__ import annotations

from typing import List

import torch

from jaggedrec.kernels import sequence_fwd
from jaggedrec.kernels.common import META_DIM, META_KEY

from jaggedrec.ops import runs_triton
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import FusedStep, OpBatch
from jaggedrec.ops.sequence_torch import output_sizes


def triton_forward(weights: torch.Tensor, batch: OpBatch, tables: FeatureTables, key_lengths: List[int]):
    """Returns the flat rows (see ``sequence_torch``) and ``[F]`` int64 counts of bad ids (skipped)."""
    out = weights.new_empty(sum(output_sizes(tables, key_lengths)))
    bad_ids = torch.zeros(tables.num_features, dtype=torch.int64, device=weights.device)
    sequence_fwd.sequence_fwd(weights, batch, tables.meta(weights), out, bad_ids, batch.bags_per_key(tables.num_keys),
                              max(tables.dims), tables.plan.alignment)
    return out, bad_ids


def _item_offsets(batch: OpBatch, tables: FeatureTables, meta: torch.Tensor):
    """``(contribution, feature) -> [M]`` element of the flat output gradient where its id's row starts."""
    num_values = batch.num_ids
    offsets = batch.offsets
    batch_size = batch.bags_per_key(tables.num_keys)
    key_bounds = offsets.index_select(0, torch.arange(tables.num_keys + 1, device=offsets.device) * batch_size).long()
    dims, keys = meta[:, META_DIM.value], meta[:, META_KEY.value]
    sizes = (key_bounds[1:] - key_bounds[:-1]).index_select(0, keys) * dims
    starts = torch.cumsum(sizes, 0) - sizes  # [F] each feature's first element

    def item_offset(contribution: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        value = contribution % num_values
        return starts[feature] + (value - key_bounds[keys[feature]]) * dims[feature]
    return item_offset


def _runs(weights: torch.Tensor, batch: OpBatch, parts: runs_triton.Contributions, tables: FeatureTables,
          meta: torch.Tensor):
    item_offset = _item_offsets(batch, tables, meta)
    return runs_triton.sorted_runs(parts, weights, lambda order, feature: (item_offset(order, feature), None))


def triton_backward(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                    deterministic: bool) -> torch.Tensor:
    """``[W]`` dense weight gradient in the weights' dtype."""
    grad_out = grad_out.contiguous().float()
    meta = tables.meta(weights)
    parts = runs_triton.contributions(batch, tables, meta)
    if deterministic:
        runs = _runs(weights, batch, parts, tables, meta)
        return runs_triton.dense_grad(grad_out, runs, weights, tables, meta)
    dest = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
    contribution = torch.arange(parts.rows.shape[0], device=batch.values.device)
    item_offset = _item_offsets(batch, tables, meta)(contribution, parts.feature.clamp(min=0).long())
    sequence_fwd.rows_grad_atomic(grad_out, parts, item_offset, meta, dest, max(tables.dims), tables.plan.alignment)
    return dest if weights.dtype == torch.float32 else dest.to(weights.dtype)


def triton_sparse_grad(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch,
                       tables: FeatureTables) -> torch.Tensor:
    grad_out = grad_out.contiguous().float()
    meta = tables.meta(weights)
    parts = runs_triton.contributions(batch, tables, meta)
    runs = _runs(weights, batch, parts, tables, meta)
    return runs_triton.sparse_grad(grad_out, runs, weights, tables, meta)


def triton_fused_update(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: FeatureTables,
                        fused: FusedStep) -> None:
    grad_out = grad_out.contiguous().float()
    meta = tables.meta(weights)
    parts = runs_triton.contributions(batch, tables, meta)
    runs = _runs(weights, batch, parts, tables, meta)
    runs_triton.fused_update(grad_out, runs, weights, tables, meta, fused)
