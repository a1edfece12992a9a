"""The Triton path of pooled embedding bags: what runs on CUDA (and, interpreted, on CPU).

Forward is one launch over every feature. Backward lists the (feature, id) contributions
with a few torch ops that never read device data on the host (``output_size`` is always
given), then launches the row-gradient kernel: sorted and deterministic by default, or with
atomics. See ``kernels/pooled_bwd.py`` for the contribution layout and ``kernels/row_runs.py``
for the runs.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from jaggedrec.kernels import pooled_bwd, pooled_fused, pooled_fwd, row_runs
from jaggedrec.kernels.common import META_FIELDS

from .pooled_torch import PooledPlan


def table_row_bases(weight_offsets, rows) -> List[int]:
    """Per feature, the first row of its table when the tables of the flat tensor are
    numbered row after row in storage order: the index into row-wise optimizer state."""
    first_row, total = {}, 0
    for offset, num_rows in sorted(set(zip(weight_offsets, rows))):
        first_row[offset] = total
        total += num_rows
    return [first_row[o] for o in weight_offsets]


def _meta_rows(plan: PooledPlan, weight_offsets, rows, dims, keys, pooling) -> Tuple[Tuple[int, ...], ...]:
    row_bases = table_row_bases(weight_offsets, rows)
    return tuple((weight_offsets[f], dims[f], rows[f], plan.out_offsets[f], keys[f], pooling[f], row_bases[f])
                 for f in range(len(dims)))


@functools.lru_cache(maxsize=256)
def _cached_meta(meta_rows: Tuple[Tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(meta_rows, dtype=torch.int64, device=device).view(-1, int(META_FIELDS))


def feature_meta(plan: PooledPlan, weight_offsets, rows, dims, keys, pooling,
                 like: torch.Tensor) -> torch.Tensor:
    """``[F, META_FIELDS]`` int64 on ``like``'s device. Eager calls reuse one cached copy, so
    the host-to-device copy (which would wait for the stream) happens once per layout."""
    meta_rows = _meta_rows(plan, weight_offsets, rows, dims, keys, pooling)
    if torch.compiler.is_compiling() or is_fake(like):
        return torch.tensor(meta_rows, dtype=torch.int64, device=like.device).view(-1, int(META_FIELDS))
    return _cached_meta(meta_rows, like.device)


def _pass_features(plan: PooledPlan, num_keys: int, like: torch.Tensor) -> torch.Tensor:
    """``[P, K]`` int32: the feature that reads key k in pass p, or -1."""
    table = [[-1] * num_keys for _ in plan.passes]
    for p, pass_ in enumerate(plan.passes):
        for f, k in zip(pass_.features, pass_.keys):
            table[p][k] = f
    if torch.compiler.is_compiling() or is_fake(like):
        return torch.tensor(table, dtype=torch.int32, device=like.device)
    return _cached_pass_features(tuple(map(tuple, table)), like.device)


@functools.lru_cache(maxsize=256)
def _cached_pass_features(table, device: torch.device) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.int32, device=device)


def triton_forward(weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                   per_sample_weights: Optional[torch.Tensor], meta: torch.Tensor, plan: PooledPlan,
                   num_keys: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``[B, total_dim]`` fp32 pooled output and ``[F]`` int64 counts of skipped bad ids."""
    batch = (offsets.shape[0] - 1) // num_keys
    out = torch.empty((batch, plan.out_offsets[-1]), dtype=torch.float32, device=weights.device)
    errors = torch.zeros(meta.shape[0], dtype=torch.int64, device=weights.device)
    pooled_fwd.pooled_fwd(weights, values, offsets, per_sample_weights, meta, out, errors, max(plan_dims(plan)),
                          plan.alignment)
    return out, errors


def plan_dims(plan: PooledPlan):
    return [plan.out_offsets[f + 1] - plan.out_offsets[f] for f in range(len(plan.out_offsets) - 1)]


def _contributions(weights, values, offsets, meta, plan, num_keys):
    """Every (pass, id) pair: ``[P*N]`` feature (int32, -1 masked), row element offset (-1
    masked), and ``[N]`` bag of each id."""
    num_ids = values.shape[0]
    batch = (offsets.shape[0] - 1) // num_keys
    lengths = (offsets[1:] - offsets[:-1]).long()
    bag_of_value = torch.repeat_interleave(torch.arange(num_keys * batch, device=values.device), lengths,
                                           output_size=num_ids)
    key_of_value = torch.div(bag_of_value, batch, rounding_mode="floor") if batch else bag_of_value
    feature = _pass_features(plan, num_keys, weights)[:, key_of_value].reshape(-1)  # [P*N]
    ids = values.long().repeat(len(plan.passes))
    safe = feature.clamp(min=0).long()
    in_table = (feature >= 0) & (ids >= 0) & (ids < meta[safe, 2])
    rows = torch.where(in_table, meta[safe, 0] + ids * meta[safe, 1], -1)
    feature = torch.where(in_table, feature, -1).to(torch.int32)
    return feature, rows, bag_of_value.to(torch.int64)


def _sorted_runs(grad_out, feature, rows, bag_of_value, offsets, per_sample_weights, meta, plan, num_keys,
                 weights_numel):
    return row_runs.sort_runs(rows, feature, bag_of_value, offsets, per_sample_weights, meta,
                                (offsets.shape[0] - 1) // num_keys, grad_out.stride(0),
                                any(any(p.mean) for p in plan.passes), weights_numel < 2**31)


def triton_backward(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                    per_sample_weights: Optional[torch.Tensor], meta: torch.Tensor, plan: PooledPlan,
                    num_keys: int, need_weight_grad: bool, need_psw_grad: bool,
                    deterministic: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Dense ``[W]`` weight gradient (weights' dtype) and ``[N]`` fp32 per-sample-weight gradient."""
    grad_out = grad_out.contiguous().float()
    max_dim = max(plan_dims(plan))
    feature, rows, bag_of_value = _contributions(weights, values, offsets, meta, plan, num_keys)
    grad_weights = grad_psw = None
    if need_weight_grad:
        dest = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
        if deterministic:
            runs = _sorted_runs(grad_out, feature, rows, bag_of_value, offsets, per_sample_weights, meta, plan,
                                num_keys, weights.numel())
            row_runs.rows_grad(grad_out, runs, meta, dest, True, max_dim, plan.alignment)
        else:
            pooled_bwd.rows_grad_atomic(grad_out, rows, feature, bag_of_value, offsets, per_sample_weights,
                                        meta, dest, max_dim, plan.alignment)
        grad_weights = dest if weights.dtype == torch.float32 else dest.to(weights.dtype)
    if need_psw_grad:
        per_contribution = torch.empty(rows.shape[0], dtype=torch.float32, device=weights.device)
        pooled_bwd.psw_grad(grad_out, weights, rows, feature, bag_of_value, offsets, meta, per_contribution,
                            max_dim, plan.alignment)
        grad_psw = per_contribution.view(len(plan.passes), values.shape[0]).sum(0)
    return grad_weights, grad_psw


def triton_sparse_grad(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                       per_sample_weights: Optional[torch.Tensor], meta: torch.Tensor, plan: PooledPlan,
                       num_keys: int) -> torch.Tensor:
    """``[W]`` sparse COO gradient over the touched rows' elements (eager: sizes the output on the host)."""
    grad_out = grad_out.contiguous().float()
    max_dim = max(plan_dims(plan))
    feature, rows, bag_of_value = _contributions(weights, values, offsets, meta, plan, num_keys)
    runs = _sorted_runs(grad_out, feature, rows, bag_of_value, offsets, per_sample_weights, meta, plan, num_keys,
                        weights.numel())
    num_rows = int(runs.num_runs)  # eager only: the sparse gradient's size depends on the data
    compact = torch.zeros((num_rows, max_dim), dtype=torch.float32, device=weights.device)
    row_runs.rows_grad(grad_out, runs, meta, compact, False, max_dim, plan.alignment)
    row_dims = meta[runs.run_feature[:num_rows], 1]
    columns = torch.arange(max_dim, device=weights.device)
    used = columns.unsqueeze(0) < row_dims.unsqueeze(1)
    indices = (runs.run_row[:num_rows].unsqueeze(1) + columns.unsqueeze(0))[used]
    return torch.sparse_coo_tensor(indices.unsqueeze(0), compact[used].to(weights.dtype), weights.shape,
                                   is_coalesced=True, check_invariants=False)


def triton_fused_update(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                        per_sample_weights: Optional[torch.Tensor], meta: torch.Tensor, plan: PooledPlan,
                        num_keys: int, optimizer: int, hparams: torch.Tensor, step: torch.Tensor,
                        state1: torch.Tensor, state2: torch.Tensor) -> None:
    """The fused optimizer step: sort the contributions by row, then one kernel sums each
    row's gradient and updates the row and its state in place (see ``kernels/pooled_fused.py``)."""
    step.add_(1)
    grad_out = grad_out.contiguous().float()
    feature, rows, bag_of_value = _contributions(weights, values, offsets, meta, plan, num_keys)
    runs = _sorted_runs(grad_out, feature, rows, bag_of_value, offsets, per_sample_weights, meta, plan, num_keys,
                        weights.numel())
    pooled_fused.fused_update(grad_out, runs, meta, weights, state1, state2, hparams, step, optimizer,
                              max(plan_dims(plan)), plan.alignment)
