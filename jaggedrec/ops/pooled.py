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

from . import pooled_torch
from .registry import HAS_TRITON, define_host_op, define_op

BACKENDS = ("auto", "torch", "triton")


def _plan(weight_offsets, rows, dims, keys, pooling, num_keys) -> pooled_torch.PooledPlan:
    # tuples: the plan is cached on them (lru_cache needs hashable arguments)
    return pooled_torch.make_plan(tuple(weight_offsets), tuple(rows), tuple(dims), tuple(keys), tuple(pooling),
                                  num_keys)


def use_kernels(backend: str, device: torch.device) -> bool:
    """Whether the op runs the Triton kernels for tensors on ``device``."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package")
        return True
    return HAS_TRITON and device.type == "cuda"


def _triton(*storage: torch.Tensor):
    """The Triton path, for ``storage`` (flat weights, optimizer state) that the kernels index
    as dense ``[W]`` tensors; they are updated in place, so a strided one cannot be copied."""
    for t in storage:
        if not t.is_contiguous():
            raise ValueError(f"the Triton kernels need contiguous flat tables and optimizer state, got a tensor "
                             f"of shape {tuple(t.shape)} and strides {t.stride()}")
    from . import pooled_triton  # imported lazily: it pulls in the kernels
    return pooled_triton


def _batch_inputs(values: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor]):
    """The batch as both paths index it: dense 1-D tensors (the kernels compute addresses as if
    every stride were 1; a column of an ``[N, 3]`` batch, or an expanded stride-0 tensor, would
    be misread), offsets int32 or int64. A tensor that already is so is passed through; any
    other costs one copy."""
    if offsets.dtype not in (torch.int32, torch.int64):
        offsets = offsets.long()
    return (values.contiguous(), offsets.contiguous(),
            None if per_sample_weights is None else per_sample_weights.contiguous())


def _pooled_embedding_bags(
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    weight_offsets: List[int],
    rows: List[int],
    dims: List[int],
    keys: List[int],
    pooling: List[int],
    num_keys: int,
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
        weight_offsets: ``[F]`` element offset of each feature's table in ``weights``.
        rows: ``[F]`` rows of each feature's table.
        dims: ``[F]`` embedding dim of each feature's table.
        keys: ``[F]`` index of each feature's key among the KJT's ``K`` keys.
        pooling: ``[F]`` 0 for SUM, 1 for MEAN (divides by the bag length; empty bags give 0).
        num_keys: K.
        backend: "auto", "torch" or "triton".
        sparse_grad: give ``weights`` a sparse COO gradient (eager only).
        deterministic: (kernels) bit-identical weight gradients, by sorting; else atomics.
        optimizer: 0 for an ordinary weight gradient; 1 SGD, 2 row-wise Adagrad, 3 Adam to
            update the touched rows inside the backward instead, with no weight gradient.
        optimizer_state: with an optimizer, ``[hparams [5], step [1], state1, state2, trigger [0]]``
            (see :func:`pooled_embedding_bags_fused_update`): the step runs in the backward when
            ``trigger``, or ``weights``, requires grad; else empty.
    Returns:
        ``[B, sum(dims)]`` fp32, features side by side in the order given, and ``[F]`` int64
        counts of the ids outside ``[0, rows)``, which the kernels skip (always zero on the
        torch path, whose callers validate ids beforehand); a caller that trusts its ids
        need not read them.
    """
    plan = _plan(weight_offsets, rows, dims, keys, pooling, num_keys)
    values, offsets, per_sample_weights = _batch_inputs(values, offsets, per_sample_weights)
    if use_kernels(backend, weights.device):
        tri = _triton(weights)
        meta = tri.feature_meta(plan, weight_offsets, rows, dims, keys, pooling, weights)
        return tri.triton_forward(weights, values, offsets, per_sample_weights, meta, plan, num_keys)
    pooled = pooled_torch.pooled_forward(weights, values, offsets, per_sample_weights, plan, num_keys)
    return pooled, torch.zeros(len(dims), dtype=torch.int64, device=weights.device)


pooled_embedding_bags = define_op("jaggedrec::pooled_embedding_bags")(_pooled_embedding_bags)
# where run_pooled_embedding_bags finds these among the op's arguments, read off its signature
_BACKEND_ARG, _OPTIMIZER_STATE_ARG = (list(inspect.signature(_pooled_embedding_bags).parameters).index(name)
                                      for name in ("backend", "optimizer_state"))


@torch.fx.wrap  # one node of a torch.fx graph: it branches on its arguments
def run_pooled_embedding_bags(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`pooled_embedding_bags` as the modules call it, with the same arguments. An eager
    CPU forward that autograd will not see (inference) runs the op's body without the
    dispatcher, whose custom-op machinery costs ~0.1 ms a call on a 2-core EPYC (a fifth of the
    forward of 10 tables of 512 bags). Anything else goes through the op: a gradient to come, a
    compiled or traced graph, fake tensors, the kernels."""
    weights, values, offsets, per_sample_weights = args[:4]
    backend, optimizer_state = args[_BACKEND_ARG], args[_OPTIMIZER_STATE_ARG]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (weights, per_sample_weights, *optimizer_state))
    if needs_grad or use_kernels(backend, weights.device) or not pooled_torch._host_readable(weights, values, offsets):
        return pooled_embedding_bags(*args)
    return _pooled_embedding_bags(*args)


@define_op("jaggedrec::pooled_embedding_bags_backward")
def pooled_embedding_bags_backward(
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    weight_offsets: List[int],
    rows: List[int],
    dims: List[int],
    keys: List[int],
    pooling: List[int],
    num_keys: int,
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
    plan = _plan(weight_offsets, rows, dims, keys, pooling, num_keys)
    values, offsets, per_sample_weights = _batch_inputs(values, offsets, per_sample_weights)
    if use_kernels(backend, weights.device):
        tri = _triton(weights)
        meta = tri.feature_meta(plan, weight_offsets, rows, dims, keys, pooling, weights)
        grad_weights, grad_psw = tri.triton_backward(grad_out, weights, values, offsets, per_sample_weights, meta,
                                                     plan, num_keys, need_weight_grad, need_psw_grad, deterministic)
    else:
        grad_weights, grad_psw = pooled_torch.pooled_backward(grad_out, weights, values, offsets, per_sample_weights,
                                                              plan, num_keys, need_weight_grad, need_psw_grad)
    if grad_weights is None:
        grad_weights = weights.new_empty(0)
    if grad_psw is None:
        grad_psw = grad_out.new_empty(0, dtype=torch.float32)
    return grad_weights, grad_psw


@define_op("jaggedrec::pooled_embedding_bags_fused_update",
           mutates_args=("weights", "step", "state1", "state2"))
def pooled_embedding_bags_fused_update(
    grad_out: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    weight_offsets: List[int],
    rows: List[int],
    dims: List[int],
    keys: List[int],
    pooling: List[int],
    num_keys: int,
    backend: str,
    optimizer: int,
    hparams: torch.Tensor,
    step: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
) -> None:
    """One optimizer step on the rows this batch read, in place; duplicate ids are summed first.

    Args:
        grad_out: ``[B, sum(dims)]``; ``weights`` ... ``backend`` as in the forward.
        optimizer: 1 SGD, 2 row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD), 3 lazy Adam.
        hparams: ``[5]`` fp32 ``lr, eps, weight_decay, beta1, beta2`` (a tensor, so that a new
            learning rate needs no recompilation).
        step: ``[1]`` int64 steps taken; incremented.
        state1: row-wise Adagrad ``[R]`` (R = rows of all tables), Adam ``[W]`` first moments.
        state2: Adam ``[W]`` second moments. Unused states may be empty.
    """
    values, offsets, per_sample_weights = _batch_inputs(values, offsets, per_sample_weights)
    if use_kernels(backend, weights.device):
        tri = _triton(weights, state1, state2)
        plan = _plan(weight_offsets, rows, dims, keys, pooling, num_keys)
        meta = tri.feature_meta(plan, weight_offsets, rows, dims, keys, pooling, weights)
        tri.triton_fused_update(grad_out, weights, values, offsets, per_sample_weights, meta, plan, num_keys,
                                optimizer, hparams, step, state1, state2)
        return
    if weights.device.type == "cpu":
        torch.ops.jaggedrec.pooled_embedding_bags_fused_update_host(
            grad_out, weights, values, offsets, per_sample_weights, weight_offsets, rows, dims, keys, pooling,
            num_keys, optimizer, hparams, step, state1, state2)
        return
    _fused_update_torch(grad_out, weights, values, offsets, per_sample_weights, weight_offsets, rows, dims, keys,
                        pooling, num_keys, optimizer, hparams, step, state1, state2)


@define_host_op("jaggedrec::pooled_embedding_bags_fused_update_host", mutates_args=("weights", "step", "state1", "state2"))
def _fused_update_host(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                       per_sample_weights: Optional[torch.Tensor], weight_offsets: List[int], rows: List[int],
                       dims: List[int], keys: List[int], pooling: List[int], num_keys: int, optimizer: int,
                       hparams: torch.Tensor, step: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor) -> None:
    """The torch-path update on CPU, opaque to torch.compile, so that a compiled backward runs
    the eager update (cache-sized chunks, touched rows streamed or scattered as the data
    decides) and not its static-shape twin, whose ``[ids, dim]`` temporaries made a compiled
    step at 20 ids per bag several times slower than the eager one."""
    _fused_update_torch(grad_out, weights, values, offsets, per_sample_weights, weight_offsets, rows, dims, keys,
                        pooling, num_keys, optimizer, hparams, step, state1, state2)


def _fused_update_torch(grad_out, weights, values, offsets, per_sample_weights, weight_offsets, rows, dims, keys,
                        pooling, num_keys, optimizer, hparams, step, state1, state2) -> None:
    from . import fused_torch, pooled_triton
    fused_torch.fused_update(grad_out, weights, values, offsets, per_sample_weights,
                             _plan(weight_offsets, rows, dims, keys, pooling, num_keys), num_keys, optimizer,
                             hparams, step, state1, state2, pooled_triton.table_row_bases(weight_offsets, rows))


def _sparse_weight_grad(grad_out, weights, values, offsets, psw, static) -> torch.Tensor:
    """``[W]`` sparse COO gradient holding only the elements of touched rows."""
    weight_offsets, rows, dims, keys, pooling, num_keys, backend = static
    plan = _plan(weight_offsets, rows, dims, keys, pooling, num_keys)
    values, offsets, psw = _batch_inputs(values, offsets, psw)
    if use_kernels(backend, weights.device):
        tri = _triton(weights)
        meta = tri.feature_meta(plan, weight_offsets, rows, dims, keys, pooling, weights)
        return tri.triton_sparse_grad(grad_out, weights, values, offsets, psw, meta, plan, num_keys)
    index_parts, value_parts = [], []
    for p, touched, sums in pooled_torch.pooled_row_grads(grad_out, values, offsets, psw, plan, num_keys):
        first = p.weight_start + touched.long() * p.dim
        index_parts.append((first.unsqueeze(1) + torch.arange(p.dim, device=first.device)).reshape(-1))
        value_parts.append(sums.reshape(-1))
    if not index_parts:
        return torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=weights.device),
                                       weights.new_empty(0), weights.shape)
    grad = torch.sparse_coo_tensor(torch.cat(index_parts).unsqueeze(0), torch.cat(value_parts).to(weights.dtype),
                                   weights.shape, is_coalesced=len(index_parts) == 1, check_invariants=False)
    return grad if len(index_parts) == 1 else grad.coalesce()


def _setup_context(ctx, inputs, output) -> None:
    (weights, values, offsets, psw, weight_offsets, rows, dims, keys, pooling, num_keys, backend,
     sparse_grad, deterministic, optimizer, optimizer_state) = inputs
    ctx.save_for_backward(weights, values, offsets, psw, *optimizer_state[:4])
    ctx.static = (weight_offsets, rows, dims, keys, pooling, num_keys, backend)
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic
    ctx.optimizer = optimizer


def _backward(ctx, grad_out, _grad_errors):
    weights, values, offsets, psw, *optimizer_state = ctx.saved_tensors
    need_weight_grad, _, _, need_psw_grad = ctx.needs_input_grad[:4]
    need_psw_grad = bool(need_psw_grad and psw is not None)
    trigger_grad = bool(ctx.optimizer and ctx.needs_input_grad[_OPTIMIZER_STATE_ARG][-1])
    grad_weights = grad_psw = None
    # the step happens here; no weight gradient leaves
    fused_step = bool(ctx.optimizer and (need_weight_grad or trigger_grad))
    sparse = bool(ctx.sparse_grad and need_weight_grad)
    dense_weight_grad = need_weight_grad and not (fused_step or sparse)
    # before the fused step: d(out)/d(per-sample weight) is a row as the forward read it
    if dense_weight_grad or need_psw_grad:
        dense_w, dense_psw = torch.ops.jaggedrec.pooled_embedding_bags_backward(
            grad_out.contiguous(), weights, values, offsets, psw, *ctx.static,
            dense_weight_grad, need_psw_grad, ctx.deterministic)
        if dense_weight_grad:
            grad_weights = dense_w
        if need_psw_grad:
            grad_psw = dense_psw.to(psw.dtype)
    if fused_step:
        torch.ops.jaggedrec.pooled_embedding_bags_fused_update(
            grad_out.contiguous(), weights, values, offsets, psw, *ctx.static, ctx.optimizer, *optimizer_state)
    elif sparse:
        grad_weights = _sparse_weight_grad(grad_out, weights, values, offsets, psw, ctx.static)
    state_grads = [None] * len(ctx.needs_input_grad[_OPTIMIZER_STATE_ARG])
    if trigger_grad:
        state_grads[-1] = grad_out.new_zeros(0, dtype=torch.float32)
    return (grad_weights, None, None, grad_psw) + (None,) * (_OPTIMIZER_STATE_ARG - 4) + (state_grads,)


pooled_embedding_bags.register_autograd(_backward, setup_context=_setup_context)
