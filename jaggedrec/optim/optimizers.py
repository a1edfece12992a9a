"""``in_backward_optimizer_filter`` at TorchRec's path (``torchrec.optim.optimizers``): which
parameters a dense optimizer should step.

A parameter is stepped in the backward, and so left out, when
``torch.distributed.optim._apply_optimizer_in_backward`` gave it an optimizer (torch marks it
with ``_in_backward_optimizers``) or when it belongs to a jaggedrec collection with a fused
optimizer: its flat weights then require no gradient, and its ``backward_trigger`` (an empty
parameter that makes autograd run the fused step) gets an empty one. Parameters that require
no gradient for any other reason are left out too, as a dense optimizer has nothing to do
with them.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Tuple

import torch


def _stepped_elsewhere(name: str, p: torch.Tensor) -> bool:
    return hasattr(p, "_in_backward_optimizers") or not p.requires_grad or name.endswith("backward_trigger")


def in_backward_optimizer_filter(named_parameters: Iterable[Tuple[str, torch.Tensor]],
                                 include: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """The ``(name, parameter)`` pairs a dense optimizer should step; with ``include``, the
    others (stepped in the backward, or requiring no gradient)."""
    for name, p in named_parameters:
        if _stepped_elsewhere(name, p) == include:
            yield name, p


__all__ = ["in_backward_optimizer_filter"]
