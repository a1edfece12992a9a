"""Fused optimizers: applied to the touched rows inside the backward, no weight gradient.

Pass one to ``EmbeddingBagCollection(..., fused_optimizer=...)``. The rest of the model keeps
its usual ``torch.optim`` optimizer; the collection's flat weights then get no ``.grad``, and
optimizers skip them. Each backward through the collection is one step.

For one touched row with summed gradient ``g`` (duplicate ids summed first):

* ``SGD(lr)``: ``w -= lr * g``.
* ``RowWiseAdagrad(lr, eps, weight_decay)``, FBGEMM's EXACT_ROWWISE_ADAGRAD:
  ``g += weight_decay * w``; ``state += mean(g ** 2)`` (one value per row);
  ``w -= lr * g / (sqrt(state) + eps)``. With ``weight_decay_mode="decouple"`` (FBGEMM's
  WeightDecayMode.DECOUPLE) the state takes the gradient alone and the row decays apart:
  ``w = (1 - lr * weight_decay) * w - lr * g / (sqrt(state) + eps)``.

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
* ``Adagrad(lr, eps, weight_decay)``, FBGEMM's EXACT_ADAGRAD (``torch.optim.Adagrad`` on the
  touched rows): ``g += weight_decay * w``; ``momentum1 += g ** 2`` (element-wise);
  ``w -= lr * g / (sqrt(momentum1) + eps)``. FBGEMM's has no weight decay (0 here matches it).
* ``LarsSGD(lr, eta, momentum, weight_decay)``, FBGEMM's LARS_SGD: per row,
  ``lr' = lr * eta * |w| / (|g| + weight_decay * |w|)`` (``|.|``: the row's L2 norm);
  ``momentum1 = momentum * momentum1 + lr' * (g + weight_decay * w)``; ``w -= momentum1``.
* ``PartialRowWiseAdam(lr, betas, eps, weight_decay)``, FBGEMM's PARTIAL_ROWWISE_ADAM:
  ``momentum1 = b1 * momentum1 + (1 - b1) * g`` (element-wise);
  ``momentum2 = b2 * momentum2 + (1 - b2) * mean(g ** 2)`` (one value per row);
  ``w -= lr * (momentum1 / (1 - b1 ** t) / (sqrt(momentum2 / (1 - b2 ** t)) + eps)
  + weight_decay * w)`` (decoupled weight decay, as FBGEMM's).

* ``LAMB(lr, betas, eps, weight_decay)``, FBGEMM's LAMB: Adam's element-wise moments, then
  ``r = momentum1 / (1 - b1 ** t) / (sqrt(momentum2 / (1 - b2 ** t)) + eps) + weight_decay * w``
  and ``w -= lr * |w| / |r| * r`` (the row's trust ratio, norms over the row).
* ``PartialRowWiseLAMB(lr, betas, eps, weight_decay)``, FBGEMM's PARTIAL_ROWWISE_LAMB: LAMB with
  partial row-wise Adam's row-wise second moment.

Every optimizer takes ``max_gradient=`` (keyword only; FBGEMM's ``gradient_clipping`` with
its ``max_gradient``): each element of the output gradient is clamped to
``[-max_gradient, max_gradient]`` before anything else (per-id weights, MEAN's ``1/length``,
the sum over duplicate ids), as FBGEMM's TBE does. None (the default) clips nothing.

The state buffers of the last five are named as FBGEMM's TBE names them (``momentum1``,
``momentum2``); ``t`` is the collection's step count, this step included.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Optional, Tuple

from jaggedrec.optim.rowwise_adagrad import RowWiseAdagrad as _TorchRowWiseAdagrad

SGD_KIND, ROWWISE_ADAGRAD_KIND, ADAM_KIND = 1, 2, 3
EXACT_ADAGRAD_KIND, LARS_SGD_KIND, PARTIAL_ROWWISE_ADAM_KIND, LAMB_KIND, PARTIAL_ROWWISE_LAMB_KIND = 4, 5, 6, 7, 8
ROWWISE_ADAGRAD_DECOUPLED_KIND = 9

# frozen, with FusedOptimizer's __repr__ kept by every subclass (a dataclass would write its own)
_config = dataclass(frozen=True, repr=False)


@_config
class FusedOptimizer:
    """Base of the fused optimizer configs."""

    lr: float
    max_gradient: Optional[float] = field(default=None, kw_only=True)

    kind: ClassVar[int] = 0
    #: the state tensors: name, and ``"row"`` (one value per table row) or ``"element"``
    state: ClassVar[Tuple[Tuple[str, str], ...]] = ()
    #: whether a row's step reads sums over all of its columns (a row-wise state, a row norm):
    #: column-wise shards cannot make them alone
    needs_whole_rows: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {self.lr}")
        if self.max_gradient is not None and not self.max_gradient > 0:
            raise ValueError(f"{type(self).__name__}: max_gradient must be > 0 (None: no clipping), "
                             f"got {self.max_gradient}")

    def __repr__(self) -> str:
        # max_gradient shows only where it clips: unclipped configs print as they always have
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.repr and not (f.name == "max_gradient" and self.max_gradient is None)]
        return f"{type(self).__name__}({', '.join(shown)})"

    def hyperparameters(self, lr: float) -> list:
        """``[lr, eps, weight_decay, beta1, beta2]`` as the kernels read them (LARS-SGD puts
        ``momentum`` and ``eta`` where the betas go), then ``max_gradient`` where it clips."""
        return self._step_parameters(lr) + ([] if self.max_gradient is None else [self.max_gradient])

    def _step_parameters(self, lr: float) -> list:
        return [lr, getattr(self, "eps", 0.0), getattr(self, "weight_decay", 0.0), *getattr(self, "betas", (0.0, 0.0))]


@_config
class SGD(FusedOptimizer):
    kind = SGD_KIND


@_config
class RowWiseAdagrad(FusedOptimizer):
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"  # or "decouple" (see the module docstring)

    state = (("sum_sq", "row"),)
    needs_whole_rows = True

    @property
    def kind(self) -> int:  # type: ignore[override]
        return ROWWISE_ADAGRAD_DECOUPLED_KIND if self.weight_decay_mode == "decouple" else ROWWISE_ADAGRAD_KIND

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_decay_mode not in ("l2", "decouple"):
            raise ValueError(f"RowWiseAdagrad: weight_decay_mode must be 'l2' or 'decouple', "
                             f"got {self.weight_decay_mode!r}")

    def __new__(cls, *args: Any, **kwargs: Any):
        # parameters first: TorchRec's torch optimizer of this name (see the module docstring)
        if "params" in kwargs or (args and not isinstance(args[0], numbers.Real)):
            return _TorchRowWiseAdagrad(*args, **kwargs)
        return super().__new__(cls)


@_config
class _Moments(FusedOptimizer):
    """What the Adam family shares: two moments' decay rates, ``eps`` and weight decay."""

    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {self.betas}")


@_config
class Adam(_Moments):
    kind = ADAM_KIND
    state = (("exp_avg", "element"), ("exp_avg_sq", "element"))


@_config
class Adagrad(FusedOptimizer):
    lr: float = 1e-2
    eps: float = 1e-10
    weight_decay: float = 0.0

    kind = EXACT_ADAGRAD_KIND
    state = (("momentum1", "element"),)


@_config
class LarsSGD(FusedOptimizer):
    lr: float = 1e-2
    eta: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    kind = LARS_SGD_KIND
    state = (("momentum1", "element"),)
    needs_whole_rows = True

    def _step_parameters(self, lr: float) -> list:
        return [lr, 0.0, self.weight_decay, self.momentum, self.eta]


@_config
class PartialRowWiseAdam(_Moments):
    kind = PARTIAL_ROWWISE_ADAM_KIND
    state = (("momentum1", "element"), ("momentum2", "row"))
    needs_whole_rows = True


@_config
class LAMB(_Moments):
    kind = LAMB_KIND
    state = (("momentum1", "element"), ("momentum2", "element"))
    needs_whole_rows = True


@_config
class PartialRowWiseLAMB(LAMB):
    kind = PARTIAL_ROWWISE_LAMB_KIND
    state = (("momentum1", "element"), ("momentum2", "row"))
