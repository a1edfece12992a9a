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
  ``w = (1 - lr * weight_decay) * w - lr * g / (sqrt(state) + eps)``. With
  ``weight_decay_mode="counter"`` or ``"cowclip"`` and ``counter=CounterRegularization(...)``,
  FBGEMM's COUNTER and COWCLIP: per-row counters scale the step and the decay (see the class).

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
  ``weight_decay`` adds ``weight_decay * w`` to ``g`` first; with ``weight_decay_mode="decouple"``
  (AdamW-style, FBGEMM's form) the moments take ``g`` alone and
  ``w -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)``. ``Adagrad`` takes the same
  mode: ``w -= lr * (g / (sqrt(momentum1) + eps) + weight_decay * w)``.
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

Every optimizer takes ``max_norm=`` (keyword only; FBGEMM's ``max_norm``, 0: off): after its
step, each touched row whose L2 norm exceeds ``max_norm`` is scaled down to it, as FBGEMM's
GPU step does (FBGEMM's CPU step ignores ``max_norm``, so the forward never renormalises, and
rows no step touched are left as they are). The norm is the updated row's, in fp32, before it
is stored in the table's dtype (the Triton step, on a row wider than one 128-column tile,
scales the stored row in one more pass: 16-bit tables round twice there).

Every optimizer takes ``max_gradient=`` (keyword only; FBGEMM's ``gradient_clipping`` with
its ``max_gradient``): each element of the output gradient is clamped to
``[-max_gradient, max_gradient]`` before anything else (per-id weights, MEAN's ``1/length``,
the sum over duplicate ids), as FBGEMM's TBE does. None (the default) clips nothing.

Every optimizer with state takes ``state_dtype=`` (keyword only; FBGEMM's
``optimizer_state_dtypes``): ``torch.float16`` or ``torch.bfloat16`` keep the state buffers in
that dtype; the step reads them as fp32, updates them, steps the row with the fp32 values and
stores them rounded to nearest. None (the default) keeps them fp32.

Every optimizer takes ``stochastic_rounding=`` and ``rounding_seed=`` (keyword only; FBGEMM's
``stochastic_rounding``, which FBGEMM turns on by default and jaggedrec leaves off, so that
rows keep the bits they had and need no seed): with it, rows of fp16/bf16 tables are rounded
from the fp32 step to one of the two nearest values, the farther with probability its distance
over their gap (unbiased), from random bits made of the seed, the step count and the element
(its position in the Triton kernel, its value and column on the torch path): the same seed
gives the same bits on the same path. fp32 tables are unaffected.

The state buffers of the last five are named as FBGEMM's TBE names them (``momentum1``,
``momentum2``); ``t`` is the collection's step count, this step included.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Optional, Tuple

import torch

from jaggedrec.optim.rowwise_adagrad import RowWiseAdagrad as _TorchRowWiseAdagrad

SGD_KIND, ROWWISE_ADAGRAD_KIND, ADAM_KIND = 1, 2, 3
EXACT_ADAGRAD_KIND, LARS_SGD_KIND, PARTIAL_ROWWISE_ADAM_KIND, LAMB_KIND, PARTIAL_ROWWISE_LAMB_KIND = 4, 5, 6, 7, 8
ROWWISE_ADAGRAD_DECOUPLED_KIND = 9
ROWWISE_ADAGRAD_COUNTER_KIND, ADAM_DECOUPLED_KIND, EXACT_ADAGRAD_DECOUPLED_KIND = 10, 11, 12

# frozen, with FusedOptimizer's __repr__ kept by every subclass (a dataclass would write its own)
_config = dataclass(frozen=True, repr=False)


@_config
class FusedOptimizer:
    """Base of the fused optimizer configs."""

    lr: float
    max_gradient: Optional[float] = field(default=None, kw_only=True)
    max_norm: float = field(default=0.0, kw_only=True)
    #: the dtype the optimizer state is kept in (FBGEMM's ``optimizer_state_dtypes``): None or
    #: torch.float32, torch.float16, torch.bfloat16; the math is fp32 either way
    state_dtype: Optional[torch.dtype] = field(default=None, kw_only=True)
    #: FBGEMM's ``stochastic_rounding``: fp16/bf16 tables take the stepped rows rounded
    #: stochastically, reproducibly from ``rounding_seed`` and the step count (off: to nearest)
    stochastic_rounding: bool = field(default=False, kw_only=True)
    rounding_seed: int = field(default=0, kw_only=True)

    kind: ClassVar[int] = 0
    #: the state tensors: name, and ``"row"`` (one value per table row) or ``"element"``
    state: ClassVar[Tuple[Tuple[str, str], ...]] = ()

    @property
    def buffers(self) -> Tuple[Tuple[str, str], ...]:
        """The state as the collection keeps it (``state``, where row-wise Adagrad's counters
        share one ``[rows, 2]`` buffer, ``"row_pair"``)."""
        return self.state
    #: whether a row's step reads sums over all of its columns (a row-wise state, a row norm):
    #: column-wise shards cannot make them alone
    needs_whole_rows: ClassVar[bool] = False
    #: fields printed only where they differ from their default: options added after the
    #: configs' reprs were printed in docs and examples
    _quiet: ClassVar[Tuple[str, ...]] = ("max_gradient", "max_norm", "counter", "state_dtype", "stochastic_rounding",
                                         "rounding_seed")

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {self.lr}")
        if not self.max_norm >= 0:
            raise ValueError(f"{type(self).__name__}: max_norm must be >= 0 (0: rows are not renormalised), "
                             f"got {self.max_norm}")
        if self.max_gradient is not None and not self.max_gradient > 0:
            raise ValueError(f"{type(self).__name__}: max_gradient must be > 0 (None: no clipping), "
                             f"got {self.max_gradient}")
        if self.state_dtype is not None:
            if self.state_dtype not in _STATE_DTYPES:
                raise ValueError(f"{type(self).__name__}: state_dtype must be torch.float32, torch.float16 or "
                                 f"torch.bfloat16 (None: float32), got {self.state_dtype!r}")
            if not self.state:
                raise ValueError(f"{type(self).__name__}: state_dtype {self.state_dtype} given, but "
                                 f"{type(self).__name__} keeps no optimizer state")

        if not 0 <= self.rounding_seed < 1 << 24:  # kept exactly in the fp32 hparams
            raise ValueError(f"{type(self).__name__}: rounding_seed must be in [0, 2**24), got {self.rounding_seed}")
        if self.stochastic_rounding and self.max_norm:
            raise ValueError(f"{type(self).__name__}: stochastic_rounding with max_norm is not fused by jaggedrec yet")

    @property
    def state_storage(self) -> torch.dtype:
        """The dtype of the ``state`` buffers (row-wise Adagrad's counters stay fp32)."""
        return torch.float32 if self.state_dtype is None else self.state_dtype

    def __repr__(self) -> str:
        # the options show only where set: configs without them print as they always have
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.repr and not (f.name in self._quiet and f.default is not MISSING
                                    and getattr(self, f.name) == f.default)]
        return f"{type(self).__name__}({', '.join(shown)})"

    def hyperparameters(self, lr: float) -> list:
        """``[lr, eps, weight_decay, beta1, beta2]`` as the kernels read them (LARS-SGD puts
        ``momentum`` and ``eta`` where the betas go), then ``max_gradient`` where it clips;
        with further options, ``max_gradient`` (inf: none) and the options' own (see
        ``jaggedrec.ops.fused_rules_kinds``)."""
        extra = self._option_parameters()
        if not extra:
            return self._step_parameters(lr) + ([] if self.max_gradient is None else [self.max_gradient])
        return self._step_parameters(lr) + [math.inf if self.max_gradient is None else self.max_gradient] + extra

    def _option_parameters(self) -> list:
        # stochastic rounding: the table dtype's code (1 here; the collection writes each storage
        # group's, see jaggedrec.ops.fused_rules_kinds.ROUNDING_HPARAMS) and the seed
        if self.stochastic_rounding:
            return [self.max_norm, 1.0, float(self.rounding_seed)]
        return [self.max_norm] if self.max_norm else []

    def _step_parameters(self, lr: float) -> list:
        return [lr, getattr(self, "eps", 0.0), getattr(self, "weight_decay", 0.0), *getattr(self, "betas", (0.0, 0.0))]


_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DECAY_MODES = {"l2": 0, "decouple": 0, "counter": 3, "cowclip": 4}
_COUNTER_DECAY_MODES = {"none": 0, "l2": 1, "decouple": 2, "adagradw": 3}
_LEARNING_RATE_MODES = {"equal": -1, "counter_sgd": 2}


@dataclass(frozen=True)
class CounterRegularization:
    """What row-wise Adagrad's ``weight_decay_mode="counter"`` and ``"cowclip"`` read: FBGEMM's
    ``CounterBasedRegularizationDefinition`` and ``CowClipDefinition`` fields, by their names.

    Every touched row counts its steps (``row_counter``; with ``counter_halflife > 0`` the
    count decays by half every ``counter_halflife`` steps, with 0 it is 1, below 0 it counts
    up) and remembers its last step (``prev_iter``). ``counter_weight_decay_mode``: ``"none"``,
    ``"l2"`` (the weight decay enters the squares, and the row decays by ``1 - f * wd * m``,
    ``f = counter_halflife / row_counter``, ``m`` the step's multiplier), ``"decouple"``
    (``1 - f * wd * lr``) or ``"adagradw"`` (FBGEMM's ADAGRADW: the decay of the steps a row
    missed applied when it is next touched). ``learning_rate_mode``: ``"equal"`` or
    ``"counter_sgd"`` (rows counted past ``tail_id_threshold`` step by
    ``lr / (sqrt(adjustment_ub * row_counter) + eps)``); FBGEMM's tail-id modes, which read a
    maximum counter over the whole table, are not fused. The weight decay and learning-rate
    adjustments start after ``adjustment_iter`` steps (<= 0: at once). COWCLIP clips each
    row's gradient norm to ``row_counter * max(weight_norm_coefficient * |w|, lower_bound)``.
    """

    counter_weight_decay_mode: str = "none"
    counter_halflife: int = -1
    adjustment_iter: int = -1
    adjustment_ub: float = 1.0
    learning_rate_mode: str = "equal"
    tail_id_threshold: float = 0.0
    weight_norm_coefficient: float = 0.0
    lower_bound: float = 0.0

    def __post_init__(self) -> None:
        if self.counter_weight_decay_mode not in _COUNTER_DECAY_MODES:
            raise ValueError(f"RowWiseAdagrad: counter_weight_decay_mode must be one of {list(_COUNTER_DECAY_MODES)}, "
                             f"got {self.counter_weight_decay_mode!r}")
        if self.learning_rate_mode not in _LEARNING_RATE_MODES:
            raise ValueError(f"RowWiseAdagrad: learning_rate_mode {self.learning_rate_mode!r} is not fused by "
                             f"jaggedrec; use 'equal' or 'counter_sgd' (FBGEMM's tail-id modes need a table-wide "
                             f"maximum counter)")


@_config
class SGD(FusedOptimizer):
    kind = SGD_KIND


@_config
class RowWiseAdagrad(FusedOptimizer):
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"  # or "decouple", "counter", "cowclip" (see the module docstring)
    counter: Optional[CounterRegularization] = None  # "counter" and "cowclip" only

    needs_whole_rows = True

    @property
    def kind(self) -> int:  # type: ignore[override]
        if self.weight_decay_mode in ("counter", "cowclip"):
            return ROWWISE_ADAGRAD_COUNTER_KIND
        return ROWWISE_ADAGRAD_DECOUPLED_KIND if self.weight_decay_mode == "decouple" else ROWWISE_ADAGRAD_KIND

    @property
    def state(self):  # type: ignore[override]
        if self.counter is None:
            return (("sum_sq", "row"),)
        # FBGEMM's names; the two counters are kept side by side, [rows, 2], as "counter"
        return (("sum_sq", "row"), ("prev_iter", "row"), ("row_counter", "row"))

    @property
    def buffers(self):  # type: ignore[override]
        return (("sum_sq", "row"), ("counter", "row_pair")) if self.counter is not None else self.state

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_decay_mode not in _DECAY_MODES:
            raise ValueError(f"RowWiseAdagrad: weight_decay_mode must be one of {list(_DECAY_MODES)}, "
                             f"got {self.weight_decay_mode!r}")
        if self.counter is not None and self.state_storage != torch.float32:
            raise ValueError(f"RowWiseAdagrad: state_dtype {self.state_dtype} with weight_decay_mode "
                             f"{self.weight_decay_mode!r} is not fused by jaggedrec (the counters' sums stay fp32)")
        if self.counter is not None and self.stochastic_rounding:
            raise ValueError(f"RowWiseAdagrad: stochastic_rounding with weight_decay_mode {self.weight_decay_mode!r} "
                             f"is not fused by jaggedrec")
        if self.counter is not None and self.max_norm:
            raise ValueError(f"RowWiseAdagrad: max_norm with weight_decay_mode {self.weight_decay_mode!r} is not "
                             f"fused by jaggedrec")
        if (self.counter is not None) != bool(_DECAY_MODES[self.weight_decay_mode]):
            raise ValueError(f"RowWiseAdagrad: weight_decay_mode {self.weight_decay_mode!r} "
                             f"{'takes no' if self.counter is not None else 'needs a'} counter=CounterRegularization(...)")

    def _option_parameters(self) -> list:
        c = self.counter
        if c is None:
            return super()._option_parameters()
        return [self.max_norm, float(_DECAY_MODES[self.weight_decay_mode]), float(_COUNTER_DECAY_MODES[c.counter_weight_decay_mode]),
                float(c.counter_halflife), float(c.adjustment_iter), float(c.adjustment_ub),
                float(_LEARNING_RATE_MODES[c.learning_rate_mode]), float(c.tail_id_threshold),
                float(c.weight_norm_coefficient), float(c.lower_bound)]

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


class _DecayMode:
    """``weight_decay_mode``: ``"l2"`` (the default: ``weight_decay * w`` joins the gradient) or
    ``"decouple"`` (AdamW-style: the state takes the bare gradient and the row decays apart)."""

    def _check_mode(self) -> None:
        if self.weight_decay_mode not in ("l2", "decouple"):
            raise ValueError(f"{type(self).__name__}: weight_decay_mode must be 'l2' or 'decouple' "
                             f"('counter' and 'cowclip' are row-wise Adagrad's), got {self.weight_decay_mode!r}")


@_config
class Adam(_Moments, _DecayMode):
    weight_decay_mode: str = "l2"

    state = (("exp_avg", "element"), ("exp_avg_sq", "element"))
    _quiet = ("max_gradient", "max_norm", "weight_decay_mode", "state_dtype", "stochastic_rounding", "rounding_seed")

    @property
    def kind(self) -> int:  # type: ignore[override]
        return ADAM_DECOUPLED_KIND if self.weight_decay_mode == "decouple" else ADAM_KIND

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_mode()


@_config
class Adagrad(FusedOptimizer, _DecayMode):
    lr: float = 1e-2
    eps: float = 1e-10
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"

    state = (("momentum1", "element"),)
    _quiet = ("max_gradient", "max_norm", "weight_decay_mode", "state_dtype", "stochastic_rounding", "rounding_seed")

    @property
    def kind(self) -> int:  # type: ignore[override]
        return EXACT_ADAGRAD_DECOUPLED_KIND if self.weight_decay_mode == "decouple" else EXACT_ADAGRAD_KIND

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_mode()


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
