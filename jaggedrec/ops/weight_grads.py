"""What an op's backward owes the flat weights: a dense gradient, a sparse one, or a fused
optimizer step and no gradient at all. Decided once here for every op.

With a fused optimizer the weights require no gradient; autograd runs the backward because
the last tensor of ``optimizer_state``, the module's empty ``backward_trigger`` parameter,
requires one (see ``fused_state.py``). Its gradient is empty too.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch


class WeightGrad(NamedTuple):
    fused_step: bool  # the optimizer steps the rows in the backward; no weight gradient leaves
    sparse: bool      # a sparse COO weight gradient
    dense: bool       # a dense [W] weight gradient
    trigger: bool     # the backward trigger asks for its (empty) gradient


def weight_grad(optimizer: int, sparse_grad: bool, need_weight_grad: bool,
                needs_state_grad: Sequence[bool]) -> WeightGrad:
    trigger = bool(optimizer and needs_state_grad and needs_state_grad[-1])
    fused_step = bool(optimizer and (need_weight_grad or trigger))
    sparse = bool(sparse_grad and need_weight_grad and not fused_step)
    return WeightGrad(fused_step, sparse, bool(need_weight_grad and not (fused_step or sparse)), trigger)


def clipped_grad(grad_out: torch.Tensor, hparams: torch.Tensor) -> torch.Tensor:
    """The output gradient a fused step reads: clamped to ``[-max_gradient, max_gradient]``
    where the optimizer clips (FBGEMM's ``gradient_clipping``: each output gradient element,
    before per-id weights, MEAN's 1/length and the sums over duplicate ids), which its
    ``[6]`` ``hparams`` say (``hparams[5]``); else as it is."""
    if hparams.shape[0] <= 5:
        return grad_out
    bound = hparams[5].to(grad_out.dtype)
    return torch.minimum(torch.maximum(grad_out, -bound), bound)


def state_grads(plan: WeightGrad, needs_state_grad: Sequence[bool], like: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """The gradients of ``optimizer_state``: None, but an empty one for the trigger."""
    grads: List[Optional[torch.Tensor]] = [None] * len(needs_state_grad)
    if plan.trigger:
        grads[-1] = like.new_zeros(0, dtype=torch.float32)
    return grads
