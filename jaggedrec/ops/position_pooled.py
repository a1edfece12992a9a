"""``jaggedrec::position_weighted_embedding_bags``: pooled embedding bags whose ids are weighted
by their position in their bag, read from per-key position weights.

The op takes the position weights themselves (``[P]``, every key's concatenated) and where
each key's start and length, not a per-id weight tensor: the Triton forward reads an id's
weight from its position inside the pooling loop (``kernels/pooled_fwd.py``, ``POSITIONAL``),
so the forward builds no ``[N]`` weights. The torch path, whose ``embedding_bag`` only takes
per-id weights, builds them in two passes (:func:`per_id_position_weights`). The backward
builds them once, for the row gradients and the fused step, and gives the position weights'
gradient: per position, the sum over the ids at that position of dot(bag gradient, row),
which is the per-id weight gradient summed by position.

Positions at or past a key's length are refused by the caller (``check_bag_lengths`` in
``modules/feature_processor_.py``, as TorchRec's gather fails on them): eagerly a ValueError
naming the feature. Unchecked (compiled on CUDA), the kernel weighs them 1.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from jaggedrec.ops import pooled_torch, vbe
from jaggedrec.ops.backends import batch_inputs, check_storage, use_kernels
from jaggedrec.ops.feature_tables import FeatureTables, feature_tables
from jaggedrec.ops.registry import define_op
from jaggedrec.ops.weight_grads import clipped_grad, state_grads, weight_grad

_INT32_MAX = 2 ** 31 - 1


def bag_bases(key_positions: Sequence[int], bags_per_key: int, device: torch.device) -> torch.Tensor:
    """``[K*B']`` int64: where each bag's key's position weights start (key-major bags).

    Args:
        key_positions: per key ``base, length`` flattened (``length < 0``: no position weights).
    """
    bases = torch.tensor(list(key_positions[0::2]), dtype=torch.int64, device=device)
    return bases.repeat_interleave(bags_per_key)


def position_index(offsets: torch.Tensor, bag_base: torch.Tensor, num_ids, narrow: bool = True) -> torch.Tensor:
    """``[N]`` the index of each id's weight: ``bag_base[i] + p`` for id ``p`` of bag ``i``.

    A running sum: 1 per id, plus at each bag's start the change of shift (base minus start)
    from the bag before, empty bags telescoping away, so one ``cumsum`` over ``[N]``. int32 when
    ``narrow`` and it fits (cumsum and gather ~1.3x faster than int64 on one CPU thread); a
    compiled graph's id count is unbacked, so int64 there rather than guard on its size.
    """
    narrow = narrow and not torch.compiler.is_compiling() and num_ids <= _INT32_MAX
    dtype = torch.int32 if narrow else torch.int64
    shift = (bag_base - offsets[:-1]).to(dtype)
    change = torch.diff(shift, prepend=shift.new_zeros(1))
    steps = torch.ones(num_ids + 1, dtype=dtype, device=shift.device)
    steps[0] = 0
    steps.index_add_(0, offsets[:-1].long(), change)  # a start at N (trailing empty bags) lands in the spare slot
    return steps[:num_ids].cumsum(0, dtype=dtype)


def per_id_position_weights(position_weights: torch.Tensor, offsets: torch.Tensor, key_positions: Sequence[int],
                            num_keys: int, num_ids) -> torch.Tensor:
    """``[N]`` the weight of each id by its position (1 for keys without position weights),
    for the torch path and the backward: the op's ``key_positions`` read as a gather index."""
    bags_per_key = (offsets.shape[0] - 1) // num_keys
    lengths = key_positions[1::2]
    table = position_weights
    if any(n < 0 for n in lengths):
        # keys without position weights point at a block of ones as long as any bag can be
        table = torch.cat([position_weights, position_weights.new_ones(num_ids)])
        key_positions = list(key_positions)
        for k, n in enumerate(lengths):
            if n < 0:
                key_positions[2 * k] = position_weights.shape[0]
    index = position_index(offsets, bag_bases(key_positions, bags_per_key, offsets.device), num_ids,
                           table.shape[0] <= _INT32_MAX)
    return table.index_select(0, index)


def feature_position_meta(tables: FeatureTables, key_positions: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[F, 2]`` int64 per feature its key's ``base, length`` (the kernel's ``position_meta``)."""
    return _cached_meta(tuple(tables.keys), tuple(key_positions), device)


@functools.lru_cache(maxsize=64)
def _cached_meta(keys: Tuple[int, ...], key_positions: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows = [[key_positions[2 * k], key_positions[2 * k + 1]] for k in keys]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(keys), 2)


def _check_key_positions(key_positions: Sequence[int], num_keys: int, num_weights: int) -> None:
    if len(key_positions) != 2 * num_keys:
        raise ValueError(f"position_weighted_embedding_bags: key_positions has {len(key_positions)} entries, "
                         f"expected 2 per key ({num_keys} keys)")
    for k in range(num_keys):
        base, length = key_positions[2 * k], key_positions[2 * k + 1]
        if length >= 0 and (base < 0 or base + length > num_weights):
            raise ValueError(f"position_weighted_embedding_bags: key {k}'s position weights [{base}, "
                             f"{base + length}) are outside the {num_weights} given")


@define_op("jaggedrec::position_weighted_embedding_bags")
def position_weighted_embedding_bags(
    weights: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    position_weights: torch.Tensor,
    inverse_indices: Optional[torch.Tensor],
    tables: List[int],
    key_positions: List[int],
    backend: str,
    sparse_grad: bool,
    deterministic: bool,
    optimizer: int,
    optimizer_state: List[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pool each feature's rows, id ``p`` of a bag weighted by its key's position weight ``p``.

    Args:
        position_weights: ``[P]`` float, every key's position weights concatenated.
        key_positions: per KJT key ``base, length`` flattened: key ``k``'s ids at position ``p``
            weigh ``position_weights[base + p]`` (``p < length``; longer bags must be refused
            before the call); ``length < 0``: the key's ids weigh 1.
        The others as in ``pooled_embedding_bags`` (there the ``[N]`` ``per_sample_weights``).
    Returns:
        ``[B, sum(dims)]`` fp32 and ``[F]`` int64 bad-id counts, as ``pooled_embedding_bags``.
    """
    table_info = feature_tables(tables)
    _check_key_positions(key_positions, table_info.num_keys, position_weights.shape[0])
    if use_kernels(backend, weights.device):
        check_storage(weights)
        from jaggedrec.ops import pooled_triton  # imported lazily: it pulls in the kernels
        from jaggedrec.kernels import legacy_loops
        if not legacy_loops.enabled():
            batch = batch_inputs(values, offsets, None, inverse_indices)
            meta = feature_position_meta(table_info, key_positions, weights.device)
            return pooled_triton.triton_forward(weights, batch, table_info, position_weights.contiguous(), meta)
    psw = per_id_position_weights(position_weights, offsets, key_positions, table_info.num_keys, values.shape[0])
    if use_kernels(backend, weights.device):  # the old loops read per-id weights only
        return pooled_triton.triton_forward(weights, batch_inputs(values, offsets, psw, inverse_indices), table_info)
    pooled = pooled_torch.pooled_forward(weights, batch_inputs(values, offsets, psw, inverse_indices), table_info)
    if inverse_indices is not None:
        pooled = vbe.expand_rows(pooled, inverse_indices, table_info.plan.out_offsets)
    return pooled, torch.zeros(table_info.num_features, dtype=torch.int64, device=weights.device)


_STATE_ARG = 11  # optimizer_state's place among the op's arguments


def _setup_context(ctx, inputs, output) -> None:
    (weights, values, offsets, position_weights, inverse_indices, tables, key_positions, backend, sparse_grad,
     deterministic, optimizer, optimizer_state) = inputs
    ctx.save_for_backward(weights, values, offsets, position_weights, inverse_indices, *optimizer_state[:4])
    ctx.static = (tables, backend)
    ctx.key_positions = key_positions
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic
    ctx.optimizer = optimizer


def _backward(ctx, grad_out, _grad_bad_ids):
    """As ``pooled_embedding_bags``' backward with the per-id weights built here once; the
    position weights' gradient is the per-id weight gradient summed by position."""
    weights, values, offsets, position_weights, inverse_indices, *optimizer_state = ctx.saved_tensors
    tables = feature_tables(ctx.static[0])
    need_weight_grad, need_pw_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    key_positions = ctx.key_positions
    num_ids = values.shape[0]
    psw = per_id_position_weights(position_weights.detach(), offsets, key_positions, tables.num_keys, num_ids)
    fused_grad = clipped_grad(grad_out, optimizer_state[0]) if optimizer_state else grad_out
    if inverse_indices is not None:  # VBE: from here on, one gradient row per bag slot
        clipped = fused_grad is not grad_out
        bags_per_key = (offsets.shape[0] - 1) // tables.num_keys
        grad_out = vbe.sum_shared_bags(grad_out, inverse_indices, tables.plan.out_offsets, bags_per_key)
        fused_grad = (vbe.sum_shared_bags(fused_grad, inverse_indices, tables.plan.out_offsets, bags_per_key)
                      if clipped else grad_out)
    needs_state_grad = ctx.needs_input_grad[_STATE_ARG]
    plan = weight_grad(ctx.optimizer, ctx.sparse_grad, need_weight_grad, needs_state_grad)
    if plan.sparse:
        raise NotImplementedError("position_weighted_embedding_bags: sparse weight gradients are not supported; "
                                  "pass per-id weights to pooled_embedding_bags instead")
    grad_weights = grad_pw = None
    if plan.dense or need_pw_grad:
        dense_w, grad_psw = torch.ops.jaggedrec.pooled_embedding_bags_backward(
            grad_out.contiguous(), weights, values, offsets, psw, *ctx.static, plan.dense, need_pw_grad,
            ctx.deterministic)
        if plan.dense:
            grad_weights = dense_w
        if need_pw_grad:
            grad_pw = position_grad(grad_psw, position_weights, offsets, key_positions, tables.num_keys, num_ids)
    if plan.fused_step:
        torch.ops.jaggedrec.pooled_embedding_bags_fused_update(
            fused_grad.contiguous(), weights, values, offsets, psw, inverse_indices, *ctx.static, ctx.optimizer,
            *optimizer_state)
    return ((grad_weights, None, None, grad_pw) + (None,) * (_STATE_ARG - 4)
            + (state_grads(plan, needs_state_grad, grad_out),))


def position_grad(grad_psw: torch.Tensor, position_weights: torch.Tensor, offsets: torch.Tensor,
                  key_positions: Sequence[int], num_keys: int, num_ids) -> torch.Tensor:
    """``[P]`` the position weights' gradient: ``grad_psw`` (``[N]``, d loss / d per-id weight)
    summed by the position weight each id reads; keys without position weights give none.
    Summed with ``index_put_(accumulate=True)``: deterministic on CUDA too."""
    bags_per_key = (offsets.shape[0] - 1) // num_keys
    num_weights = position_weights.shape[0]
    lengths = key_positions[1::2]
    positions = list(key_positions)
    for k, n in enumerate(lengths):
        if n < 0:  # a spare slot past the end, dropped below
            positions[2 * k] = num_weights
    index = position_index(offsets, bag_bases(positions, bags_per_key, offsets.device), num_ids, False)
    # ids of weightless keys may count past the spare slot: clamp them into it
    index = index.clamp(max=num_weights)
    grad = grad_psw.new_zeros(num_weights + 1, dtype=torch.float32)
    grad.index_put_((index,), grad_psw.float(), accumulate=True)
    return grad[:num_weights].to(position_weights.dtype)


position_weighted_embedding_bags.register_autograd(_backward, setup_context=_setup_context)


@torch.fx.wrap  # one node of a torch.fx graph
def run_position_weighted_embedding_bags(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`position_weighted_embedding_bags` as the modules call it."""
    return position_weighted_embedding_bags(*args)


__all__ = ["position_weighted_embedding_bags", "per_id_position_weights", "position_index", "bag_bases"]