"""The sharders' ``fused_params``, in TorchRec's form, mapped onto ``jaggedrec.optim``::

    {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.02, "eps": 0.002}

``optimizer`` may be FBGEMM's ``EmbOptimType`` (when installed), the ``EmbOptimType`` here
(the same names, no FBGEMM needed) or its name as a string. A parameter given an optimizer
by ``torch.distributed.optim._apply_optimizer_in_backward`` (TorchRec's second way) is read
the same way: ``torch.optim.SGD``, ``torch.optim.Adam`` and ``torch.optim.Adagrad`` map onto the
fused SGD, Adam and exact Adagrad, and ``jaggedrec.optim.rowwise_adagrad.RowWiseAdagrad`` onto
the fused row-wise Adagrad, each with the torch optimizer's defaults for what the kwargs leave
out. TorchRec's placeholders (``torchrec.optim.optimizers``: ``LarsSGD``, ``PartialRowWiseAdam``,
``LAMB``, ``PartialRowWiseLAMB``, ``Adagrad``, ``Adam``, ``SGD``; the same names in
``jaggedrec.optim.optimizers``) take FBGEMM's
keyword arguments (``lr`` or ``learning_rate``, ``eps``, ``eta``, ``momentum``, ``beta1``,
``beta2``, ``weight_decay``), with FBGEMM's defaults, as ``fused_params`` do. (TorchRec's own
RowWiseAdagrad cannot be attached to jaggedrec's flat weights: it makes its state at
construction from ``[rows, dim]`` parameters.)
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Dict, Optional

import torch
from torch import nn

from jaggedrec import optim
from jaggedrec.optim.optimizers import in_backward_optimizer_filter
from jaggedrec.optim.rowwise_adagrad import RowWiseAdagrad as TorchRowWiseAdagrad


class EmbOptimType(Enum):
    """FBGEMM's optimizer names that jaggedrec fuses."""

    SGD = "sgd"
    EXACT_SGD = "exact_sgd"
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"
    ROWWISE_ADAGRAD = "row_wise_adagrad"
    ADAM = "adam"
    EXACT_ADAGRAD = "exact_adagrad"
    LARS_SGD = "lars_sgd"
    PARTIAL_ROWWISE_ADAM = "partial_row_wise_adam"
    LAMB = "lamb"
    PARTIAL_ROWWISE_LAMB = "partial_row_wise_lamb"


_KNOWN = ("learning_rate", "eps", "weight_decay", "beta1", "beta2", "eta", "momentum", "optimizer",
          "gradient_clipping", "max_gradient", "weight_decay_mode", "counter_based_regularization",
          "cowclip_regularization", "max_norm", "optimizer_state_dtypes",
          "stochastic_rounding")
# TorchRec's in-backward placeholders (torchrec.optim.optimizers, and jaggedrec's of the same
# names): each stands for the EmbOptimType its kwargs configure
_PLACEHOLDERS = {"SGD": "EXACT_SGD", "Adam": "ADAM", "Adagrad": "EXACT_ADAGRAD", "LarsSGD": "LARS_SGD",
                 "PartialRowWiseAdam": "PARTIAL_ROWWISE_ADAM", "LAMB": "LAMB", "PartialRowWiseLAMB": "PARTIAL_ROWWISE_LAMB"}
_PLACEHOLDER_MODULES = ("torchrec.optim.optimizers", "jaggedrec.optim.optimizers")


def fused_optimizer_from_params(fused_params: Optional[Dict[str, Any]]) -> Optional[optim.FusedOptimizer]:
    """The ``jaggedrec.optim`` config for ``fused_params``, or None when it names no optimizer."""
    if not fused_params or "optimizer" not in fused_params:
        return None
    unknown = sorted(set(fused_params) - set(_KNOWN))
    if unknown:
        raise ValueError(f"fused_params: jaggedrec does not know the keys {unknown} (it reads {list(_KNOWN)})")
    config = _config_from_params(fused_params)
    dtypes = fused_params.get("optimizer_state_dtypes")
    return _with_state_dtype(config, dtypes) if dtypes else config


# FBGEMM's SparseType names (or values) of the state dtypes jaggedrec keeps
_STATE_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}


def _with_state_dtype(config: optim.FusedOptimizer, dtypes: Dict[str, Any]) -> optim.FusedOptimizer:
    """FBGEMM's ``optimizer_state_dtypes`` (``{"momentum1": SparseType.FP16, ...}``; states left
    out stay fp32) as the config's one ``state_dtype``: jaggedrec keeps all of an optimizer's
    state in one dtype, so the states named must be all of them, in one dtype (or fp32)."""
    kind = type(config).__name__
    names = [f"momentum{i + 1}" for i in range(len(config.state))]
    unknown = sorted(set(dtypes) - set(names))
    if unknown:
        raise ValueError(f"fused_params: optimizer_state_dtypes names {unknown}, but {kind} keeps {names or 'none'}")
    found = set()
    for name in names:
        value = dtypes.get(name, "FP32")
        key = (value.name if isinstance(value, Enum) else str(value)).upper()
        if key not in _STATE_DTYPES:
            raise ValueError(f"fused_params: optimizer_state_dtypes[{name!r}] {value!r} is not kept by jaggedrec "
                             f"for {kind}; use FP32, FP16 or BF16")
        found.add(_STATE_DTYPES[key])
    if len(found) > 1:
        raise ValueError(f"fused_params: optimizer_state_dtypes {dict(dtypes)} differ between {kind}'s states; "
                         f"jaggedrec keeps all of them ({names}) in one dtype")
    dtype = found.pop()
    return config if dtype == torch.float32 else dataclasses.replace(config, state_dtype=dtype)


def _config_from_params(fused_params: Dict[str, Any]) -> optim.FusedOptimizer:
    kind = fused_params["optimizer"]
    name = (kind.name if isinstance(kind, Enum) else str(kind)).upper()
    name = {e.value.upper(): e.name for e in EmbOptimType}.get(name, name)  # FBGEMM's value strings too
    lr = float(fused_params.get("learning_rate", 0.01))
    eps = float(fused_params.get("eps", 1e-8))
    decay = float(fused_params.get("weight_decay", 0.0))
    # FBGEMM's gradient_clipping (off by default) with its max_gradient (default 1.0)
    clip = dict(max_gradient=float(fused_params.get("max_gradient", 1.0))) if fused_params.get("gradient_clipping") else {}
    if fused_params.get("max_norm"):  # FBGEMM's default 0.0: no renormalisation
        clip["max_norm"] = float(fused_params["max_norm"])
    if fused_params.get("stochastic_rounding"):  # FBGEMM's default is on, jaggedrec's off (docs/training.md)
        clip["stochastic_rounding"] = True
    if name in ("SGD", "EXACT_SGD"):
        return optim.SGD(lr, **clip)
    mode = fused_params.get("weight_decay_mode")
    mode = None if mode is None else (mode.name if isinstance(mode, Enum) else str(mode)).upper()
    if name in ("EXACT_ROWWISE_ADAGRAD", "ROWWISE_ADAGRAD", "EXACT_ROW_WISE_ADAGRAD", "ROW_WISE_ADAGRAD"):
        # FBGEMM's WeightDecayMode: NONE steps without weight decay, L2 adds it to the gradient,
        # DECOUPLE decays the row apart, COUNTER and COWCLIP with their definitions; left out,
        # jaggedrec's L2 (FBGEMM's default is NONE)
        if mode not in (None, "NONE", "L2", "DECOUPLE", "COUNTER", "COWCLIP"):
            raise ValueError(f"fused_params: weight_decay_mode {mode} is not fused by jaggedrec for "
                             f"EXACT_ROWWISE_ADAGRAD; use NONE, L2, DECOUPLE, COUNTER or COWCLIP")
        counter = _counter_definition(fused_params, mode)
        return optim.RowWiseAdagrad(lr, eps=eps, weight_decay=0.0 if mode == "NONE" else decay,
                                    weight_decay_mode=mode.lower() if mode in ("DECOUPLE", "COUNTER", "COWCLIP")
                                    else "l2", counter=counter, **clip)
    for key in ("counter_based_regularization", "cowclip_regularization"):
        if fused_params.get(key) is not None:
            raise ValueError(f"fused_params: {key} applies to EXACT_ROWWISE_ADAGRAD only, not {name}")
    if mode not in (None, "NONE") and not (mode == "DECOUPLE" and name in ("ADAM", "EXACT_ADAGRAD")):
        raise ValueError(f"fused_params: weight_decay_mode {mode} is not fused by jaggedrec for {name} (row-wise "
                         f"Adagrad takes L2, DECOUPLE, COUNTER and COWCLIP; ADAM and EXACT_ADAGRAD DECOUPLE)")
    betas = (float(fused_params.get("beta1", 0.9)), float(fused_params.get("beta2", 0.999)))
    decoupled = dict(weight_decay_mode="decouple") if mode == "DECOUPLE" else {}
    if name == "ADAM":
        return optim.Adam(lr, betas=betas, eps=eps, weight_decay=decay, **decoupled, **clip)
    if name == "EXACT_ADAGRAD":
        if decay and not decoupled:  # FBGEMM's exact Adagrad has none; jaggedrec would not silently differ
            raise ValueError(f"fused_params: FBGEMM's EXACT_ADAGRAD takes no weight_decay, got {decay}; "
                             f"pass fused_optimizer=jaggedrec.optim.Adagrad(lr, weight_decay=...) for an L2 term")
        return optim.Adagrad(lr, eps=eps, weight_decay=decay if decoupled else 0.0, **decoupled, **clip)
    if name == "LARS_SGD":
        return optim.LarsSGD(lr, eta=float(fused_params.get("eta", 0.001)),
                             momentum=float(fused_params.get("momentum", 0.9)), weight_decay=decay, **clip)
    if name == "PARTIAL_ROWWISE_ADAM":
        return optim.PartialRowWiseAdam(lr, betas=betas, eps=eps, weight_decay=decay, **clip)
    if name == "LAMB":
        return optim.LAMB(lr, betas=betas, eps=eps, weight_decay=decay, **clip)
    if name == "PARTIAL_ROWWISE_LAMB":
        return optim.PartialRowWiseLAMB(lr, betas=betas, eps=eps, weight_decay=decay, **clip)
    raise ValueError(f"fused_params: optimizer {kind!r} is not fused by jaggedrec; use SGD/EXACT_SGD, "
                     f"EXACT_ROWWISE_ADAGRAD, ADAM, EXACT_ADAGRAD, LARS_SGD, PARTIAL_ROWWISE_ADAM, LAMB or "
                     f"PARTIAL_ROWWISE_LAMB")


def _enum_name(value: Any) -> str:
    return (value.name if isinstance(value, Enum) else str(value)).lower()


def _counter_definition(fused_params: Dict[str, Any], mode: Optional[str]) -> Optional[optim.fused.CounterRegularization]:
    """FBGEMM's CounterBasedRegularizationDefinition (COUNTER) or CowClipDefinition (COWCLIP),
    as FBGEMM's objects or dicts of their fields, as ``jaggedrec.optim.fused.CounterRegularization``."""
    key = {"COUNTER": "counter_based_regularization", "COWCLIP": "cowclip_regularization"}.get(mode or "")
    for other in ("counter_based_regularization", "cowclip_regularization"):
        if other != key and fused_params.get(other) is not None:
            raise ValueError(f"fused_params: {other} needs weight_decay_mode "
                             f"{'COUNTER' if other.startswith('counter') else 'COWCLIP'}, got {mode}")
    if key is None:
        return None
    definition = fused_params.get(key)
    if definition is None:
        raise ValueError(f"fused_params: weight_decay_mode {mode} needs {key} (FBGEMM's definition)")
    fields = dict(definition) if isinstance(definition, dict) else dict(vars(definition))
    threshold = fields.pop("tail_id_threshold", 0.0)
    if getattr(threshold, "is_ratio", False):
        raise ValueError("fused_params: a tail_id_threshold given as a ratio (is_ratio=True) is not fused by "
                         "jaggedrec: it reads a table-wide maximum counter")
    fields.pop("max_counter_update_freq", None)  # the maximum counter is read by the tail-id modes only
    if _enum_name(fields.pop("grad_sum_decay", "no_decay")) != "no_decay":
        raise ValueError("fused_params: grad_sum_decay other than NO_DECAY is not fused by jaggedrec")
    for name in ("counter_weight_decay_mode", "learning_rate_mode"):
        if name in fields:
            fields[name] = _enum_name(fields[name])
    try:
        return optim.fused.CounterRegularization(tail_id_threshold=float(getattr(threshold, "val", threshold)),
                                                 **fields)
    except TypeError as e:
        raise ValueError(f"fused_params: {key}: {e}") from None


def fused_optimizer_in_backward(module: nn.Module) -> Optional[optim.FusedOptimizer]:
    """The optimizer ``_apply_optimizer_in_backward`` attached to the module's weights, if any."""
    found = set()
    for p in module.parameters():
        for cls, kwargs in zip(getattr(p, "_optimizer_classes", ()), getattr(p, "_optimizer_kwargs", ())):
            found.add((cls, tuple(sorted(kwargs.items()))))
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"the collection's weights were given different in-backward optimizers: {found}")
    cls, kwargs = found.pop()
    kwargs = dict(kwargs)
    if cls.__module__ in _PLACEHOLDER_MODULES and cls.__name__ in _PLACEHOLDERS:
        params = {("learning_rate" if k == "lr" else k): v for k, v in kwargs.items()}
        return fused_optimizer_from_params({**params, "optimizer": _PLACEHOLDERS[cls.__name__]})
    if cls is torch.optim.SGD:
        if kwargs.get("momentum", 0) or kwargs.get("weight_decay", 0):
            raise ValueError("an in-backward torch.optim.SGD is fused without momentum or weight decay")
        return optim.SGD(float(kwargs.get("lr", 0.001)))
    if cls is torch.optim.Adam:
        return optim.Adam(float(kwargs.get("lr", 0.001)), betas=tuple(kwargs.get("betas", (0.9, 0.999))),
                          eps=float(kwargs.get("eps", 1e-8)), weight_decay=float(kwargs.get("weight_decay", 0.0)))
    if cls is torch.optim.Adagrad:
        unfused = {k: kwargs[k] for k in ("lr_decay", "initial_accumulator_value", "maximize") if kwargs.get(k)}
        if unfused:
            raise ValueError(f"an in-backward torch.optim.Adagrad is fused without lr_decay, "
                             f"initial_accumulator_value or maximize; got {unfused}")
        return optim.Adagrad(float(kwargs.get("lr", 1e-2)), eps=float(kwargs.get("eps", 1e-10)),
                             weight_decay=float(kwargs.get("weight_decay", 0.0)))
    if cls in (TorchRowWiseAdagrad, optim.RowWiseAdagrad):  # the second makes the first, given parameters
        unfused = {k: kwargs[k] for k in ("lr_decay", "initial_accumulator_value", "maximize") if kwargs.get(k)}
        if unfused:
            raise ValueError(f"an in-backward RowWiseAdagrad is fused without lr_decay, initial_accumulator_value "
                             f"or maximize; got {unfused}")
        return optim.RowWiseAdagrad(float(kwargs.get("lr", 1e-2)), eps=float(kwargs.get("eps", 1e-10)),
                                    weight_decay=float(kwargs.get("weight_decay", 0.0)))
    raise ValueError(f"in-backward optimizer {cls.__name__} is not fused by jaggedrec; use torch.optim.SGD, "
                     f"torch.optim.Adam, torch.optim.Adagrad, RowWiseAdagrad (jaggedrec.optim.rowwise_adagrad), "
                     f"TorchRec's {sorted(_PLACEHOLDERS)} (torchrec.optim.optimizers), or the sharder's fused_params")
