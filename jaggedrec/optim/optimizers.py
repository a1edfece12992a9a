"""``in_backward_optimizer_filter`` at TorchRec's path (``torchrec.optim.optimizers``): which
parameters a dense optimizer should step; and TorchRec's in-backward placeholders there
(``SGD``, ``Adam``, ``Adagrad``, ``LarsSGD``, ``PartialRowWiseAdam``, ``LAMB``,
``PartialRowWiseLAMB``): optimizer classes that
never step themselves, given to ``_apply_optimizer_in_backward`` with FBGEMM's keyword
arguments to name the fused optimizer a sharder applies (see
``jaggedrec.distributed.fused_params``).

A parameter is stepped in the backward, and so left out, when
``torch.distributed.optim._apply_optimizer_in_backward`` gave it an optimizer (torch marks it
with ``_in_backward_optimizers``) or when it belongs to a jaggedrec collection with a fused
optimizer: its flat weights then require no gradient, and its ``backward_trigger`` (an empty
parameter that makes autograd run the fused step) gets an empty one. Parameters that require
no gradient for any other reason are left out too, as a dense optimizer has nothing to do
with them.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Tuple

import torch
from torch.optim import Optimizer


def _stepped_elsewhere(name: str, p: torch.Tensor) -> bool:
    return hasattr(p, "_in_backward_optimizers") or not p.requires_grad or name.endswith("backward_trigger")


def in_backward_optimizer_filter(named_parameters: Iterable[Tuple[str, torch.Tensor]],
                                 include: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """The ``(name, parameter)`` pairs a dense optimizer should step; with ``include``, the
    others (stepped in the backward, or requiring no gradient)."""
    for name, p in named_parameters:
        if _stepped_elsewhere(name, p) == include:
            yield name, p


class _Placeholder(Optimizer):
    """Names a fused optimizer for ``_apply_optimizer_in_backward``; its kwargs are FBGEMM's."""

    def __init__(self, params: Iterable[torch.Tensor], **kwargs: Any) -> None:
        self._params = params
        self._kwargs = kwargs

    @torch.no_grad()
    def step(self, closure=None) -> None:
        raise NotImplementedError(f"{type(self).__name__} is stepped by a sharded collection's fused backward, "
                                  f"not on its own")


class SGD(_Placeholder):
    """FBGEMM's EXACT_SGD."""


class Adam(_Placeholder):
    """FBGEMM's ADAM."""


class Adagrad(_Placeholder):
    """FBGEMM's EXACT_ADAGRAD."""


class LarsSGD(_Placeholder):
    """FBGEMM's LARS_SGD."""


class PartialRowWiseAdam(_Placeholder):
    """FBGEMM's PARTIAL_ROWWISE_ADAM."""


class LAMB(_Placeholder):
    """FBGEMM's LAMB."""


class PartialRowWiseLAMB(_Placeholder):
    """FBGEMM's PARTIAL_ROWWISE_LAMB."""


__all__ = ["Adagrad", "Adam", "LAMB", "LarsSGD", "PartialRowWiseAdam", "PartialRowWiseLAMB", "SGD",
           "in_backward_optimizer_filter"]
