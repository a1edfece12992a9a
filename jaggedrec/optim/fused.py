"""Fused optimizers: applied to the touched rows inside the backward, no weight gradient.

Pass one to ``EmbeddingBagCollection(..., fused_optimizer=...)``. The rest of the model keeps
its usual ``torch.optim`` optimizer; the collection's flat weights then get no ``.grad``, and
optimizers skip them. Each backward through the collection is one step.

For one touched row with summed gradient ``g`` (duplicate ids summed first):

* ``SGD(lr)``: ``w -= lr * g``.
* ``RowWiseAdagrad(lr, eps, weight_decay)``, FBGEMM's EXACT_ROWWISE_ADAGRAD:
  ``g += weight_decay * w``; ``state += mean(g ** 2)`` (one value per row);
  ``w -= lr * g / (sqrt(state) + eps)``.
* ``Adam(lr, betas, eps, weight_decay)``, lazy: moments of touched rows only, as
  ``torch.optim.SparseAdam`` does, with bias correction by the collection's step count;
  ``weight_decay`` adds ``weight_decay * w`` to ``g`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

SGD_KIND, ROWWISE_ADAGRAD_KIND, ADAM_KIND = 1, 2, 3


@dataclass(frozen=True)
class FusedOptimizer:
    """Base of the fused optimizer configs."""

    lr: float

    kind: ClassVar[int] = 0
    #: the state tensors: name, and ``"row"`` (one value per table row) or ``"element"``
    state: ClassVar[Tuple[Tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {self.lr}")

    def hyperparameters(self, lr: float) -> list:
        """``[lr, eps, weight_decay, beta1, beta2]`` as the kernels read them."""
        return [lr, getattr(self, "eps", 0.0), getattr(self, "weight_decay", 0.0), *getattr(self, "betas", (0.0, 0.0))]


@dataclass(frozen=True)
class SGD(FusedOptimizer):
    kind = SGD_KIND


@dataclass(frozen=True)
class RowWiseAdagrad(FusedOptimizer):
    eps: float = 1e-8
    weight_decay: float = 0.0

    kind = ROWWISE_ADAGRAD_KIND
    state = (("sum_sq", "row"),)


@dataclass(frozen=True)
class Adam(FusedOptimizer):
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    kind = ADAM_KIND
    state = (("exp_avg", "element"), ("exp_avg_sq", "element"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"Adam: betas must be in [0, 1), got {self.betas}")
