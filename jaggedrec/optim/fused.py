"""Fused optimizers: applied to the touched rows inside the backward, no weight gradient.

Pass one to ``EmbeddingBagCollection(..., fused_optimizer=...)``. The rest of the model keeps
its usual ``torch.optim`` optimizer; the collection's flat weights then get no ``.grad``, and
optimizers skip them. Each backward through the collection is one step.

For one touched row with summed gradient ``g`` (duplicate ids summed first):

* ``SGD(lr)``: ``w -= lr * g``.
* ``RowWiseAdagrad(lr, eps, weight_decay)``, FBGEMM's EXACT_ROWWISE_ADAGRAD:
  ``g += weight_decay * w``; ``state += mean(g ** 2)`` (one value per row);
  ``w -= lr * g / (sqrt(state) + eps)``.

One name, two TorchRec meanings: ``torchrec.optim.RowWiseAdagrad`` is a ``torch.optim``
optimizer (``RowWiseAdagrad(params, lr=...)``), while jaggedrec's programs pass
``fused_optimizer=RowWiseAdagrad(lr, eps=...)``. ``RowWiseAdagrad`` here serves both and tells
them apart by the first argument: a learning rate (a number, or ``lr=`` alone) makes this fused
config; parameters (or ``params=``) make ``jaggedrec.optim.rowwise_adagrad.RowWiseAdagrad``,
the torch optimizer, which the sharders fuse back into this config when it is applied in the
backward. ``SGD`` and ``Adam`` are fused configs only (TorchRec's names there are
placeholders that never step).
* ``Adam(lr, betas, eps, weight_decay)``, lazy: moments of touched rows only, as
  ``torch.optim.SparseAdam`` does, with bias correction by the collection's step count;
  ``weight_decay`` adds ``weight_decay * w`` to ``g`` first.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Tuple

from jaggedrec.optim.rowwise_adagrad import RowWiseAdagrad as _TorchRowWiseAdagrad

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

    def __new__(cls, *args: Any, **kwargs: Any):
        # parameters first: TorchRec's torch optimizer of this name (see the module docstring)
        if "params" in kwargs or (args and not isinstance(args[0], numbers.Real)):
            return _TorchRowWiseAdagrad(*args, **kwargs)
        return super().__new__(cls)


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
