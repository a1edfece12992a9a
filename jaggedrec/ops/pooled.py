"""``jaggedrec::pooled_embedding_bags``: every feature of an EmbeddingBagCollection in one op.

The op knows tables only as slices of one flat weight tensor and features only as
integer lists; it knows nothing of configs or names. Static facts about the tables are
``int[]`` arguments, so torch.compile bakes them into the graph, and the batch size is
read from the offsets' shape, never from device data.

On CUDA (or with ``backend="triton"``) the op launches the Triton kernels; elsewhere
it runs the torch path in ``pooled_torch``.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

import torch

from jaggedrec.ops import backends, pooled_torch, vbe
from jaggedrec.ops.backends import batch_inputs, check_storage, use_kernels
from jaggedrec.ops.feature_tables import feature_tables
from jaggedrec.ops.op_args import FusedStep, OpBatch
from jaggedrec.ops.registry import define_host_op, define_op
from jaggedrec.ops.weight_grads import clipped_grad, state_grads, weight_grad


def _triton(*storage: torch.Tensor):
    check_storage(*storage)
    from jaggedrec.ops import pooled_triton  # imported lazily: it pulls in the kernels
    return pooled_triton


def _pooled_embedding_bags(
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    inverse_indices: Optional[torch.Tensor],
    tables: List[int],
    backend: str,
    sparse_grad: bool,
    deterministic: bool,
    optimizer: int,
    optimizer_state: List[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pool each feature's rows from its table.

    Args:
        weights: ``[W]`` flat storage of every table, one dtype.
        values: ``[N]`` int32/int64 ids, key-major as in a KJT.
        offsets: ``[K*B+1]`` int32/int64 bag starts.
        per_sample_weights: ``[N]`` float weights, or None.
        inverse_indices: VBE (see ``vbe.py``): ``[F, B]`` int64, the bag slot of key ``keys[f]``
            (in ``[0, B')``, ``offsets`` being ``[K*B'+1]``) that sample ``b`` of feature ``f``
            reads; or None, where every sample reads its own bag (``B = B'``).
        tables: the ``F`` features and their tables, ``FeatureTables.encode()``; pooling 0 is SUM,
            1 MEAN (divides by the bag length; empty bags give 0).
        backend: "auto", "torch" or "triton".
        sparse_grad: give ``weights`` a sparse COO gradient (eager only).
        deterministic: (kernels) bit-identical weight gradients, by sorting; else atomics.
        optimizer: 0 for an ordinary weight gradient; 1 SGD, 2 row-wise Adagrad, 3 Adam to
            update the touched rows inside the backward instead, with no weight gradient.
        optimizer_state: with an optimizer, ``[hparams [5], step [1], state1, state2, trigger [0]]``
            (see :func:`pooled_embedding_bags_fused_update`): the step runs in the backward when
            ``trigger``, or ``weights``, requires grad; else empty.
    Returns:
        ``[B, sum(dims)]`` fp32, features side by side in the order given, and ``bad_ids``:
        ``[F]`` int64 counts of the ids outside ``[0, rows)``, which the kernels skip (always
        zero on the torch path, whose callers validate ids beforehand); a caller that trusts
        its ids need not read them.
    """
    tables = feature_tables(tables)
    batch = batch_inputs(values, offsets, per_sample_weights, inverse_indices)
    if use_kernels(backend, weights.device):
        return _triton(weights).triton_forward(weights, batch, tables)
    pooled = pooled_torch.pooled_forward(weights, batch, tables)
    if inverse_indices is not None:
        pooled = vbe.expand_rows(pooled, inverse_indices, tables.plan.out_offsets)
    return pooled, torch.zeros(tables.num_features, dtype=torch.int64, device=weights.device)


pooled_embedding_bags = define_op("jaggedrec::pooled_embedding_bags")(_pooled_embedding_bags)
# where run_pooled_embedding_bags finds these among the op's arguments, read off its signature
_BACKEND_ARG, _OPTIMIZER_STATE_ARG = (list(inspect.signature(_pooled_embedding_bags).parameters).index(name)
                                      for name in ("backend", "optimizer_state"))


@torch.fx.wrap  # one node of a torch.fx graph: it branches on its arguments
def run_pooled_embedding_bags(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`pooled_embedding_bags` as the modules call it, with the same arguments. An eager
    CPU call on the torch path skips the dispatcher, whose custom-op machinery costs ~0.1 ms a
    call on a 2-core EPYC (a fifth of the forward of 10 tables of 512 bags): without a gradient
    to come (inference) it runs the op's body; with one, :class:`_EagerPooled` runs the same body
    and the same backward as the op's autograd formula, its backward calling the backward ops'
    bodies directly too. Anything else goes through the op: a compiled or traced graph, fake
    tensors, the kernels."""
    weights, values, offsets, per_sample_weights = args[:4]
    backend, optimizer_state = args[_BACKEND_ARG], args[_OPTIMIZER_STATE_ARG]
    if use_kernels(backend, weights.device) or not backends.host_readable(weights, values, offsets):
        return pooled_embedding_bags(*args)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (weights, per_sample_weights, *optimizer_state)):
        return _EagerPooled.apply(*args[:_OPTIMIZER_STATE_ARG], *optimizer_state)
    return _pooled_embedding_bags(*args)


def _dense_backward(
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    tables: List[int],
    backend: str,
    need_weight_grad: bool,
    need_psw_grad: bool,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense gradients of :func:`pooled_embedding_bags`.

    Args:
        grad_out: ``[B, sum(dims)]``; the other arguments as in the forward.
    Returns:
        ``[W]`` weight gradient in the weights' dtype (``[0]`` unless ``need_weight_grad``),
        ``[N]`` fp32 per-sample-weight gradient (``[0]`` unless ``need_psw_grad``).
    """
    tables = feature_tables(tables)
    batch = batch_inputs(values, offsets, per_sample_weights)
    if use_kernels(backend, weights.device):
        grad_weights, grad_psw = _triton(weights).triton_backward(grad_out, weights, batch, tables, need_weight_grad,
                                                                  need_psw_grad, deterministic)
    else:
        grad_weights, grad_psw = pooled_torch.pooled_backward(grad_out, weights, batch, tables, need_weight_grad,
                                                              need_psw_grad)
    if grad_weights is None:
        grad_weights = weights.new_empty(0)
    if grad_psw is None:
        grad_psw = grad_out.new_empty(0, dtype=torch.float32)
    return grad_weights, grad_psw


pooled_embedding_bags_backward = define_op("jaggedrec::pooled_embedding_bags_backward")(_dense_backward)


@define_op("jaggedrec::pooled_embedding_bags_fused_update",
           mutates_args=("weights", "step", "state1", "state2"))
def pooled_embedding_bags_fused_update(
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    inverse_indices: Optional[torch.Tensor],
    tables: List[int],
    backend: str,
    optimizer: int,
    hparams: torch.Tensor,
    step: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
) -> None:
    """One optimizer step on the rows this batch read, in place; duplicate ids are summed first.

    Args:
        grad_out: ``[B', sum(dims)]``, one row per bag slot (VBE: the samples' gradients summed
            per bag); ``weights`` ... ``backend`` as in the forward. ``inverse_indices`` (VBE)
            only say which bags some sample read: the ids of the others are not stepped.
        optimizer: 1 SGD, 2 row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD), 3 lazy Adam.
        hparams: ``[5]`` fp32 ``lr, eps, weight_decay, beta1, beta2`` (a tensor, so that a new
            learning rate needs no recompilation).
        step: ``[1]`` int64 steps taken; incremented.
        state1: row-wise Adagrad ``[R]`` (R = rows of all tables), Adam ``[W]`` first moments.
        state2: Adam ``[W]`` second moments. Unused states may be empty.
    """
    batch = batch_inputs(values, offsets, per_sample_weights, inverse_indices)
    fused = FusedStep(optimizer, hparams, step, state1, state2)
    if use_kernels(backend, weights.device):
        _triton(weights, state1, state2).triton_fused_update(grad_out, weights, batch, feature_tables(tables), fused)
        return
    if weights.device.type == "cpu":
        torch.ops.jaggedrec.pooled_embedding_bags_fused_update_host(grad_out, weights, *batch, tables, *fused)
        return
    _fused_update_torch(grad_out, weights, batch, tables, fused)


@define_host_op("jaggedrec::pooled_embedding_bags_fused_update_host", mutates_args=("weights", "step", "state1", "state2"))
def _fused_update_host(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                       per_sample_weights: Optional[torch.Tensor], inverse_indices: Optional[torch.Tensor],
                       tables: List[int], optimizer: int, hparams: torch.Tensor, step: torch.Tensor,
                       state1: torch.Tensor, state2: torch.Tensor) -> None:
    """The torch-path update on CPU, opaque to torch.compile, so that a compiled backward runs
    the eager update (cache-sized chunks, touched rows streamed or scattered as the data
    decides) and not its static-shape twin, whose ``[ids, dim]`` temporaries made a compiled
    step at 20 ids per bag several times slower than the eager one."""
    _fused_update_torch(grad_out, weights, OpBatch(values, offsets, per_sample_weights, inverse_indices), tables,
                        FusedStep(optimizer, hparams, step, state1, state2))


def _fused_update_torch(grad_out: torch.Tensor, weights: torch.Tensor, batch: OpBatch, tables: List[int],
                        fused: FusedStep) -> None:
    from jaggedrec.ops import fused_torch
    fused_torch.fused_update(grad_out, weights, batch, feature_tables(tables), fused)


def _sparse_weight_grad(grad_out, weights, values, offsets, psw, inverse_indices, tables: List[int],
                        backend: str) -> torch.Tensor:
    """``[W]`` sparse COO gradient holding only the elements of touched rows (VBE: of bags some sample reads)."""
    tables = feature_tables(tables)
    batch = batch_inputs(values, offsets, psw, inverse_indices)
    if use_kernels(backend, weights.device):
        return _triton(weights).triton_sparse_grad(grad_out, weights, batch, tables)
    return pooled_torch.pooled_sparse_grad(grad_out, weights, batch, tables)


def _setup_context(ctx, inputs, output) -> None:
    (weights, values, offsets, psw, inverse_indices, tables, backend, sparse_grad, deterministic, optimizer,
     optimizer_state) = inputs
    ctx.save_for_backward(weights, values, offsets, psw, inverse_indices, *optimizer_state[:4])
    ctx.static = (tables, backend)
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic
    ctx.optimizer = optimizer


def _backward(ctx, grad_out, _grad_bad_ids):
    """The op's autograd formula: the backward ops through the dispatcher (compiled graphs)."""
    needs = ctx.needs_input_grad
    grads = _grads(ctx, grad_out, needs[:4], needs[_OPTIMIZER_STATE_ARG],
                   torch.ops.jaggedrec.pooled_embedding_bags_backward,
                   torch.ops.jaggedrec.pooled_embedding_bags_fused_update)
    return grads[:_OPTIMIZER_STATE_ARG] + (list(grads[_OPTIMIZER_STATE_ARG:]),)


def _grads(ctx, grad_out: torch.Tensor, needs_input_grad, needs_state_grad, dense_backward, fused_update) -> tuple:
    """The gradients of the op's inputs, the optimizer state's flattened at the end; the fused
    step (if any) applied. ``dense_backward`` and ``fused_update``: the backward ops, or their bodies."""
    weights, values, offsets, psw, inverse_indices, *optimizer_state = ctx.saved_tensors
    need_weight_grad, _, _, need_psw_grad = needs_input_grad
    # gradient clipping (a fused optimizer's max_gradient) acts on each sample's gradient
    fused_grad = clipped_grad(grad_out, optimizer_state[0]) if optimizer_state else grad_out
    if inverse_indices is not None:  # VBE: from here on, one gradient row per bag slot
        tables = feature_tables(ctx.static[0])
        clipped = fused_grad is not grad_out
        bags_per_key = (offsets.shape[0] - 1) // tables.num_keys
        grad_out = vbe.sum_shared_bags(grad_out, inverse_indices, tables.plan.out_offsets, bags_per_key)
        fused_grad = (vbe.sum_shared_bags(fused_grad, inverse_indices, tables.plan.out_offsets, bags_per_key)
                      if clipped else grad_out)
    need_psw_grad = bool(need_psw_grad and psw is not None)
    plan = weight_grad(ctx.optimizer, ctx.sparse_grad, need_weight_grad, needs_state_grad)
    grad_weights = grad_psw = None
    # before the fused step: d(out)/d(per-sample weight) is a row as the forward read it
    if plan.dense or need_psw_grad:
        dense_w, dense_psw = dense_backward(grad_out.contiguous(), weights, values, offsets, psw, *ctx.static,
                                            plan.dense, need_psw_grad, ctx.deterministic)
        if plan.dense:
            grad_weights = dense_w
        if need_psw_grad:
            grad_psw = dense_psw.to(psw.dtype)
    if plan.fused_step:
        fused_update(fused_grad.contiguous(), weights, values, offsets, psw, inverse_indices, *ctx.static,
                     ctx.optimizer, *optimizer_state)
    elif plan.sparse:
        grad_weights = _sparse_weight_grad(grad_out, weights, values, offsets, psw, inverse_indices, *ctx.static)
    return ((grad_weights, None, None, grad_psw) + (None,) * (_OPTIMIZER_STATE_ARG - 4)
            + tuple(state_grads(plan, needs_state_grad, grad_out)))


pooled_embedding_bags.register_autograd(_backward, setup_context=_setup_context)


def _eager_fused_update(grad_out, weights, values, offsets, psw, inverse_indices, tables, backend, optimizer,
                        hparams, step, state1, state2) -> None:
    """What ``pooled_embedding_bags_fused_update`` runs for CPU tensors on the torch path."""
    _fused_update_torch(grad_out, weights, batch_inputs(values, offsets, psw, inverse_indices), tables,
                        FusedStep(optimizer, hparams, step, state1, state2))


class _EagerPooled(torch.autograd.Function):
    """:func:`pooled_embedding_bags` with its autograd formula, for eager CPU calls on the torch
    path: the same body and the same backward (bit for bit), without the dispatcher, which took
    three custom-op calls a training step (the forward, the fused update and its host op).
    Takes the op's arguments with ``optimizer_state`` spread out at the end."""

    @staticmethod
    def forward(ctx, *args):
        inputs = (*args[:_OPTIMIZER_STATE_ARG], list(args[_OPTIMIZER_STATE_ARG:]))
        pooled, bad_ids = _pooled_embedding_bags(*inputs)
        _setup_context(ctx, inputs, None)
        ctx.mark_non_differentiable(bad_ids)
        return pooled, bad_ids

    @staticmethod
    def backward(ctx, grad_out, _grad_bad_ids):
        needs = ctx.needs_input_grad
        return _grads(ctx, grad_out, needs[:4], needs[_OPTIMIZER_STATE_ARG:], _dense_backward, _eager_fused_update)
