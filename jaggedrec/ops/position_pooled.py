"""``jaggedrec::position_weighted_embedding_bags``: pooled embedding bags whose ids are weighted
by their position in their bag, read from per-key position weights.

The op takes the position weights themselves (``[P]``, every key's concatenated) and where
each key's start and length, not a per-id weight tensor: the Triton forward reads an id's
weight from its position inside the pooling loop (``kernels/pooled_fwd.py``, ``POSITIONAL``),
so the forward builds no ``[N]`` weights. The torch path, whose ``embedding_bag`` only takes
per-id weights, builds them in one running sum over the ids and one gather
(:func:`position_lookup`). The backward rebuilds them for the row gradients and the fused
step, and gives the position weights' gradient (per position weight, the sum over the ids
that read it of dot(bag gradient, row)) with them: on the torch path the per-id weight
gradient summed back through the same gather index, on the kernel path one kernel that sums
the dots per position weight, deterministically, with no per-id gradient.

Positions at or past a key's length are refused by the caller (``check_bag_lengths`` in
``modules/feature_processor_.py``, as TorchRec's gather fails on them): eagerly a ValueError
naming the feature. Unchecked (compiled on CUDA), the kernel weighs them 1.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from jaggedrec.ops import backends, pooled_torch, vbe
from jaggedrec.ops.backends import batch_inputs, check_storage, use_kernels
from jaggedrec.ops.feature_tables import FeatureTables, feature_tables
from jaggedrec.ops.registry import define_op
from jaggedrec.ops.weight_grads import clipped_grad, state_grads, weight_grad
from jaggedrec.sparse.jagged_tensor import traced

_INT32_MAX = 2 ** 31 - 1


def _bag_jumps(bases: Tuple[int, ...], bags_per_key: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[K*B']`` per bag (key-major) how far its key's base is from the bag before's: 0 inside
    a key, the change of base at a key's first bag, ``base - 1`` at bag 0 (the count's start)."""
    starts = [bases[0] - 1] + [bases[k] - bases[k - 1] for k in range(1, len(bases))]
    jumps = torch.zeros(len(bases), bags_per_key, dtype=dtype, device=device)
    if bags_per_key:
        jumps[:, 0] = torch.tensor(starts, dtype=dtype, device=device)
    return jumps.view(-1)


# eager calls reuse the jumps of a layout (never written to); a compiled graph builds them afresh
_cached_bag_jumps = functools.lru_cache(maxsize=64)(_bag_jumps)


def position_index(offsets: torch.Tensor, bases: Sequence[int], num_ids, narrow: bool = True) -> torch.Tensor:
    """``[N]`` the index of each id's position weight: ``bases[k] + p`` for the id at position
    ``p`` of a bag of key ``k`` (``offsets``: ``[K*B'+1]`` key-major bag starts).

    One running sum over ``[N]``: each id adds 1 to the one before, and a bag's first id adds
    ``1 + (jump of base) - (length of the bag before)``, added at its start by one ``index_add_``
    over the bags (empty bags telescope away; trailing ones land in a spare slot). int32 when
    ``narrow`` and it fits (the sum and the gather it feeds are cheaper than with int64 on one
    CPU thread); a compiled graph's id count is unbacked, so int64 there rather than guard on it.
    """
    compiling = traced(num_ids, offsets.shape[0])
    narrow = narrow and not compiling and num_ids <= _INT32_MAX
    dtype = torch.int32 if narrow else torch.int64
    num_keys = len(bases)
    bags_per_key = (offsets.shape[0] - 1) // num_keys if num_keys else 0
    jumps = (_bag_jumps if compiling else _cached_bag_jumps)(tuple(bases), bags_per_key, dtype, offsets.device)
    starts = offsets[:-1]
    narrowed = starts.to(dtype)
    # minus the length of the bag before: its start minus this one's, the first bag's offset itself
    change = jumps - narrowed
    change[1:] += narrowed[:-1]
    steps = torch.ones(num_ids + 1, dtype=dtype, device=offsets.device)
    steps.index_add_(0, starts.long(), change)
    return steps.cumsum_(0)[:num_ids]


def position_lookup(position_weights: torch.Tensor, offsets: torch.Tensor, key_positions: Sequence[int],
                    num_keys: int, num_ids) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the torch path and the backward read each id's position weight from: ``[P']``
    ``position_weights``, followed, when some key has none, by ``N`` ones that such keys' ids
    read, and ``[N]`` each id's index into it (:func:`position_index`). The forward gathers
    with the index; the backward sums the per-id weight gradient back by the same index."""
    table = position_weights
    bases = list(key_positions[0::2])
    if any(n < 0 for n in key_positions[1::2]):
        table = torch.cat([position_weights, position_weights.new_ones(num_ids)])
        bases = [b if n >= 0 else position_weights.shape[0] for b, n in zip(bases, key_positions[1::2])]
    assert len(bases) == num_keys
    # compiled: int64 indices (position_index), asking nothing of the unbacked sizes
    narrow = not traced(num_ids, table.shape[0]) and table.shape[0] <= _INT32_MAX
    return table, position_index(offsets, bases, num_ids, narrow)


def per_id_position_weights(position_weights: torch.Tensor, offsets: torch.Tensor, key_positions: Sequence[int],
                            num_keys: int, num_ids) -> torch.Tensor:
    """``[N]`` the weight of each id by its position (1 for keys without position weights)."""
    table, index = position_lookup(position_weights, offsets, key_positions, num_keys, num_ids)
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


def _position_weighted_embedding_bags(
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool each feature's rows, id ``p`` of a bag weighted by its key's position weight ``p``.

    Args:
        position_weights: ``[P]`` float, every key's position weights concatenated.
        key_positions: per KJT key ``base, length`` flattened: key ``k``'s ids at position ``p``
            weigh ``position_weights[base + p]`` (``p < length``; longer bags must be refused
            before the call); ``length < 0``: the key's ids weigh 1.
        The others as in ``pooled_embedding_bags`` (there the ``[N]`` ``per_sample_weights``).
    Returns:
        ``[B, sum(dims)]`` fp32 and ``[F]`` int64 bad-id counts, as ``pooled_embedding_bags``,
        and the torch path's ``[N]`` gather index (:func:`position_lookup`; ``[0]`` on the
        kernel path), kept for the backward, which then builds no index of its own.
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
            pooled, bad_ids = pooled_triton.triton_forward(weights, batch, table_info, position_weights.contiguous(),
                                                           meta)
            return pooled, bad_ids, offsets.new_empty(0, dtype=torch.int64)
    table, index = position_lookup(position_weights, offsets, key_positions, table_info.num_keys, values.shape[0])
    psw = table.index_select(0, index)
    if use_kernels(backend, weights.device):  # the old loops read per-id weights only
        pooled, bad_ids = pooled_triton.triton_forward(weights, batch_inputs(values, offsets, psw, inverse_indices),
                                                       table_info)
        return pooled, bad_ids, index
    pooled = pooled_torch.pooled_forward(weights, batch_inputs(values, offsets, psw, inverse_indices), table_info)
    if inverse_indices is not None:
        pooled = vbe.expand_rows(pooled, inverse_indices, table_info.plan.out_offsets)
    return pooled, torch.zeros(table_info.num_features, dtype=torch.int64, device=weights.device), index


position_weighted_embedding_bags = define_op("jaggedrec::position_weighted_embedding_bags")(
    _position_weighted_embedding_bags)

_STATE_ARG = 11  # optimizer_state's place among the op's arguments


def _setup_context(ctx, inputs, output) -> None:
    (weights, values, offsets, position_weights, inverse_indices, tables, key_positions, backend, sparse_grad,
     deterministic, optimizer, optimizer_state) = inputs
    ctx.save_for_backward(weights, values, offsets, position_weights, inverse_indices, output[2],
                          *optimizer_state[:4])
    ctx.static = (tables, backend)
    ctx.key_positions = key_positions
    ctx.sparse_grad = sparse_grad
    ctx.deterministic = deterministic
    ctx.optimizer = optimizer


def _backward(ctx, grad_out, _grad_bad_ids, _grad_index):
    """As ``pooled_embedding_bags``' backward, the per-id weights rebuilt here for the row
    gradients and the fused step; the position weights' gradient comes with them: on the
    torch path the per-id weight gradient summed back through the index the weights were
    gathered with, on the kernel path one kernel (``pooled_bwd.position_grad``) that sums the
    dots by position weight, with no per-id gradient."""
    weights, values, offsets, position_weights, inverse_indices, index, *optimizer_state = ctx.saved_tensors
    tables = feature_tables(ctx.static[0])
    need_weight_grad, need_pw_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    key_positions = ctx.key_positions
    num_ids = values.shape[0]
    kernels = use_kernels(ctx.static[1], weights.device)
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
    psw = table = None
    if plan.dense or plan.fused_step or (need_pw_grad and not kernels):
        if index.shape[0] == num_ids:  # the forward's (the torch path's): only the ones block to add back
            table = position_weights.detach()
            if any(n < 0 for n in key_positions[1::2]):
                table = torch.cat([table, table.new_ones(num_ids)])
        else:
            table, index = position_lookup(position_weights.detach(), offsets, key_positions, tables.num_keys,
                                           num_ids)
        psw = table.index_select(0, index)
    grad_weights = grad_pw = None
    psw_grad_here = need_pw_grad and not kernels
    if plan.dense or psw_grad_here:
        dense_w, grad_psw = torch.ops.jaggedrec.pooled_embedding_bags_backward(
            grad_out.contiguous(), weights, values, offsets, psw, *ctx.static, plan.dense, psw_grad_here,
            ctx.deterministic)
        if plan.dense:
            grad_weights = dense_w
        if psw_grad_here:
            grad_pw = sum_by_index(grad_psw, index, table.shape[0])[:position_weights.shape[0]]
    if need_pw_grad and kernels:
        grad_pw = _kernel_position_grad(grad_out, weights, values, offsets, tables, key_positions,
                                        position_weights.shape[0])
    if grad_pw is not None:
        grad_pw = grad_pw.to(position_weights.dtype)
    if plan.fused_step:
        torch.ops.jaggedrec.pooled_embedding_bags_fused_update(
            fused_grad.contiguous(), weights, values, offsets, psw, inverse_indices, *ctx.static, ctx.optimizer,
            *optimizer_state)
    return ((grad_weights, None, None, grad_pw) + (None,) * (_STATE_ARG - 4)
            + (state_grads(plan, needs_state_grad, grad_out),))


def sum_by_index(grad_psw: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``[size]`` fp32: ``grad_psw`` (``[N]``, d loss / d per-id weight) summed by ``index``
    (``[N]``, the position weight each id read), in id order. On the CPU ``index_add_`` (one
    serial pass, as autograd's gather backward sums); elsewhere ``index_put_(accumulate=True)``,
    which unlike ``index_add_`` is deterministic on CUDA."""
    grad = grad_psw.new_zeros(size, dtype=torch.float32)
    if grad.device.type == "cpu":
        return grad.index_add_(0, index, grad_psw.float())
    return grad.index_put_((index.long(),), grad_psw.float(), accumulate=True)


def _kernel_position_grad(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                          tables: FeatureTables, key_positions: Sequence[int], num_weights: int) -> torch.Tensor:
    """``[P]`` fp32 the position weights' gradient from one kernel launch (one program per
    position weight, deterministic): see ``kernels/pooled_bwd.position_grad``."""
    from jaggedrec.kernels import pooled_bwd  # imported lazily: it pulls in triton
    out = torch.empty(num_weights, dtype=torch.float32, device=weights.device)
    meta = tables.meta(weights)
    position_meta = feature_position_meta(tables, key_positions, weights.device)
    batch = batch_inputs(values, offsets, None)  # dense 1-D ids and offsets, as the kernels index them
    pooled_bwd.position_grad(grad_out.contiguous().float(), weights, batch.values, batch.offsets, meta,
                             position_meta, out, max(tables.dims), tables.plan.alignment)
    return out


position_weighted_embedding_bags.register_autograd(_backward, setup_context=_setup_context)


@torch.fx.wrap  # one node of a torch.fx graph
def run_position_weighted_embedding_bags(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`position_weighted_embedding_bags` as the modules call it: pooled and bad-id counts.
    An eager CPU forward that autograd will not see (inference) runs the op's body without the
    dispatcher, as ``pooled.run_pooled_embedding_bags`` does: the custom-op call cost up to
    ~0.2 ms, up to 0.05x of the pooling preset's unweighted forward at 20 ids per bag (thread
    CPU time, one thread, 2-core Xeon, loaded; benchmarks/results/cpu-xeon-2core-2026-12-06-fpebc-floor).
    A gradient to come, a compiled or traced graph, fake tensors and the kernels go through the op."""
    weights, values, offsets, position_weights = args[:4]
    backend, optimizer_state = args[7], args[_STATE_ARG]
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (weights, position_weights, *optimizer_state))
    if (needs_grad or use_kernels(backend, weights.device)
            or not backends.host_readable(weights, values, offsets, position_weights)):
        pooled, bad_ids, _ = position_weighted_embedding_bags(*args)
    else:
        pooled, bad_ids, _ = _position_weighted_embedding_bags(*args)
    return pooled, bad_ids


__all__ = ["position_weighted_embedding_bags", "per_id_position_weights", "position_index", "position_lookup",
           "sum_by_index"]