"""``jaggedrec::sequence_embeddings``: every id's row, for every feature of an EmbeddingCollection, in one op.

The unpooled twin of ``pooled.py``: the same ``tables`` description, backends, fused
optimizers and autograd rules, but one output row per id instead of one per bag. Its output
is one flat tensor (layout: ``sequence_torch``), whose size depends on how many ids each
key has: the caller passes those counts as ``key_lengths`` (``KJT.length_per_key()``), so
that no op reads them from the device, and a compiled graph holds them as symbols.

The torch path runs inside opaque ops (``*_host``) that torch.compile calls rather than
traces: it slices the batch by those counts, which a traced graph could not do without
guarding on them.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

import torch

from jaggedrec.ops import backends, sequence_torch
from jaggedrec.ops.backends import batch_inputs, check_storage, use_kernels
from jaggedrec.ops.feature_tables import feature_tables
from jaggedrec.ops.op_args import FusedStep
from jaggedrec.ops.registry import define_host_op, define_op
from jaggedrec.ops.weight_grads import clipped_grad, state_grads, weight_grad


def _triton(*storage: torch.Tensor):
    check_storage(*storage)
    from jaggedrec.ops import sequence_triton  # imported lazily: it pulls in the kernels
    return sequence_triton


def _output_numel(tables: List[int], key_lengths: List[int]) -> int:
    return sum(sequence_torch.output_sizes(feature_tables(tables), key_lengths))


def _sequence_embeddings(
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    tables: List[int],
    key_lengths: List[int],
    backend: str,
    sparse_grad: bool,
    deterministic: bool,
    optimizer: int,
    optimizer_state: List[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each feature's rows, one per id.

    Args:
        weights: ``[W]`` flat storage of every table, one dtype.
        values: ``[N]`` int32/int64 ids, key-major as in a KJT.
        offsets: ``[K*B+1]`` int32/int64 bag starts.
        tables: the ``F`` features and their tables, ``FeatureTables.encode()`` (pooling unused).
        key_lengths: ``[K]`` ids of each key (``sum == N``).
        backend, sparse_grad, deterministic, optimizer, optimizer_state: as in ``pooled_embedding_bags``.
    Returns:
        Flat ``[sum_f key_lengths[key_f] * dim_f]`` rows in the weights' dtype, feature after
        feature, and ``bad_ids``: ``[F]`` int64 counts of the ids outside ``[0, rows)``, which
        the kernels skip (their rows are zero; always zero counts on the torch path, whose
        callers validate ids beforehand).
    """
    batch = batch_inputs(values, offsets, None)
    if use_kernels(backend, weights.device):
        return _triton(weights).triton_forward(weights, batch, feature_tables(tables), key_lengths)
    return torch.ops.jaggedrec.sequence_embeddings_host(weights, batch.values, tables, key_lengths)


sequence_embeddings = define_op("jaggedrec::sequence_embeddings")(_sequence_embeddings)
_OPTIMIZER_STATE_ARG = list(inspect.signature(_sequence_embeddings).parameters).index("optimizer_state")


def _forward_host_fake(weights, values, tables, key_lengths):
    return (weights.new_empty(_output_numel(tables, key_lengths)),
            weights.new_zeros(feature_tables(tables).num_features, dtype=torch.int64))


def _forward_host(weights: torch.Tensor, values: torch.Tensor, tables: List[int],
                  key_lengths: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    tables = feature_tables(tables)
    return (sequence_torch.sequence_forward(weights, values, tables, key_lengths),
            torch.zeros(tables.num_features, dtype=torch.int64, device=weights.device))


define_host_op("jaggedrec::sequence_embeddings_host", fake=_forward_host_fake)(_forward_host)


@define_op("jaggedrec::sequence_embeddings_backward")
def sequence_embeddings_backward(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor,
                                 offsets: torch.Tensor, tables: List[int], key_lengths: List[int], backend: str,
                                 deterministic: bool) -> torch.Tensor:
    """``[W]`` dense weight gradient of :func:`sequence_embeddings` in the weights' dtype;
    ``grad_out`` is flat like the forward's output."""
    batch = batch_inputs(values, offsets, None)
    if use_kernels(backend, weights.device):
        return _triton(weights).triton_backward(grad_out, weights, batch, feature_tables(tables), deterministic)
    return torch.ops.jaggedrec.sequence_embeddings_backward_host(grad_out, weights, batch.values, tables, key_lengths)


@define_host_op("jaggedrec::sequence_embeddings_backward_host",
                fake=lambda grad_out, weights, values, tables, key_lengths: torch.empty_like(weights))
def _backward_host(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, tables: List[int],
                   key_lengths: List[int]) -> torch.Tensor:
    return sequence_torch.sequence_backward(grad_out, weights, values, feature_tables(tables), key_lengths)


@define_op("jaggedrec::sequence_embeddings_fused_update", mutates_args=("weights", "step", "state1", "state2"))
def sequence_embeddings_fused_update(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor,
                                     offsets: torch.Tensor, tables: List[int], key_lengths: List[int], backend: str,
                                     optimizer: int, hparams: torch.Tensor, step: torch.Tensor, state1: torch.Tensor,
                                     state2: torch.Tensor) -> None:
    """One optimizer step on the rows this batch read, in place (arguments as in
    ``pooled_embedding_bags_fused_update``); duplicate ids are summed first."""
    batch = batch_inputs(values, offsets, None)
    fused = FusedStep(optimizer, hparams, step, state1, state2)
    if use_kernels(backend, weights.device):
        _triton(weights, state1, state2).triton_fused_update(grad_out, weights, batch, feature_tables(tables), fused)
        return
    torch.ops.jaggedrec.sequence_embeddings_fused_update_host(grad_out, weights, batch.values, tables, key_lengths,
                                                              *fused)


@define_host_op("jaggedrec::sequence_embeddings_fused_update_host", mutates_args=("weights", "step", "state1", "state2"))
def _fused_update_host(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, tables: List[int],
                       key_lengths: List[int], optimizer: int, hparams: torch.Tensor, step: torch.Tensor,
                       state1: torch.Tensor, state2: torch.Tensor) -> None:
    sequence_torch.sequence_fused_update(grad_out, weights, values, feature_tables(tables), key_lengths,
                                         FusedStep(optimizer, hparams, step, state1, state2))


def _sparse_weight_grad(grad_out, weights, values, offsets, tables, key_lengths, backend) -> torch.Tensor:
    batch = batch_inputs(values, offsets, None)
    if use_kernels(backend, weights.device):
        return _triton(weights).triton_sparse_grad(grad_out, weights, batch, feature_tables(tables))
    return sequence_torch.sequence_sparse_grad(grad_out, weights, batch.values, feature_tables(tables), key_lengths)


def _setup_context(ctx, inputs, output) -> None:
    (weights, values, offsets, tables, key_lengths, backend, sparse_grad, deterministic, optimizer,
     optimizer_state) = inputs
    ctx.save_for_backward(weights, values, offsets, *optimizer_state[:4])
    ctx.static = (tables, key_lengths, backend)
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic
    ctx.optimizer = optimizer


def _backward(ctx, grad_out, _grad_bad_ids):
    weights, values, offsets, *optimizer_state = ctx.saved_tensors
    needs_state_grad = ctx.needs_input_grad[_OPTIMIZER_STATE_ARG]
    plan = weight_grad(ctx.optimizer, ctx.sparse_grad, ctx.needs_input_grad[0], needs_state_grad)
    grad_out = grad_out.contiguous()
    grad_weights: Optional[torch.Tensor] = None
    if plan.dense:
        grad_weights = torch.ops.jaggedrec.sequence_embeddings_backward(grad_out, weights, values, offsets,
                                                                        *ctx.static, ctx.deterministic)
    elif plan.fused_step:
        torch.ops.jaggedrec.sequence_embeddings_fused_update(clipped_grad(grad_out, optimizer_state[0]), weights,
                                                             values, offsets, *ctx.static, ctx.optimizer,
                                                             *optimizer_state)
    elif plan.sparse:
        grad_weights = _sparse_weight_grad(grad_out, weights, values, offsets, *ctx.static)
    return ((grad_weights,) + (None,) * (_OPTIMIZER_STATE_ARG - 1)
            + (state_grads(plan, needs_state_grad, grad_out),))


sequence_embeddings.register_autograd(_backward, setup_context=_setup_context)


@torch.fx.wrap  # one node of a torch.fx graph: it branches on its arguments
def run_sequence_embeddings(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_embeddings` as the modules call it, with the same arguments. An eager
    CPU forward that autograd will not see (inference) runs the torch path without the
    dispatcher's two op layers; anything else goes through the op."""
    weights, values, offsets, tables, key_lengths, backend = args[:6]
    optimizer_state = args[_OPTIMIZER_STATE_ARG]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (weights, *optimizer_state))
    if (needs_grad or use_kernels(backend, weights.device) or torch.compiler.is_compiling()
            or not backends.host_readable(weights, values)):
        return sequence_embeddings(*args)
    return _forward_host(weights, values.contiguous(), tables, key_lengths)
