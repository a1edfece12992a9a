"""The optimizer step rules of the torch path: what one fused step does to a block of rows.

:func:`step_in_place` steps gathered or streamed rows eagerly, in place, in few passes over
them; :func:`step_rows` is the same step as functional ops for the static (compiled, off-CPU)
path. ``fused_torch`` decides which rows are stepped and sums their gradients; the Triton
kernel (``kernels/pooled_fused.py``) implements the same rules.

The rules live by optimizer family, each with its eager and its static form:
``fused_rules_elementwise`` (SGD, exact Adagrad, Adam), ``fused_rules_rowwise`` (the
optimizers that read whole-row sums, also stepped over column blocks by
``distributed/exact_columns``), ``fused_rules_counter`` (row-wise Adagrad's COUNTER and
COWCLIP); the options that act on any stepped row in ``fused_rules_options``; the kinds and
the hyper-parameters' layout in ``fused_rules_kinds``. This module applies the options
around the family's step.
"""

from __future__ import annotations

import torch

from jaggedrec.ops import fused_rules_counter, fused_rules_elementwise, fused_rules_rowwise
from jaggedrec.ops.fused_rules_elementwise import scaled_gradient
from jaggedrec.ops.fused_rules_kinds import (ADAM, ADAM_DECOUPLED, COUNTER_HPARAMS, EXACT_ADAGRAD,
                                             EXACT_ADAGRAD_DECOUPLED, LAMB, LARS_SGD, MAX_GRADIENT, MAX_NORM,
                                             PARTIAL_ROWWISE_ADAM, PARTIAL_ROWWISE_LAMB, ROUNDING_HPARAMS,
                                             ROWWISE_ADAGRAD, ROWWISE_ADAGRAD_COUNTER, ROWWISE_ADAGRAD_DECOUPLED, SGD,
                                             STATE_LAYOUT, StepRule)
from jaggedrec.ops.fused_rules_options import renormalise_in_place, renormalised, stochastic_round

__all__ = ["ADAM", "ADAM_DECOUPLED", "COUNTER_HPARAMS", "EXACT_ADAGRAD", "EXACT_ADAGRAD_DECOUPLED", "LAMB", "LARS_SGD",
           "MAX_GRADIENT", "MAX_NORM", "PARTIAL_ROWWISE_ADAM", "PARTIAL_ROWWISE_LAMB", "ROUNDING_HPARAMS",
           "ROWWISE_ADAGRAD", "ROWWISE_ADAGRAD_COUNTER", "ROWWISE_ADAGRAD_DECOUPLED", "SGD", "STATE_LAYOUT", "StepRule",
           "scaled_gradient", "step_in_place", "step_rows", "step_rows_in_place", "stochastic_round"]


def step_in_place(rule: StepRule, w, g, s1, s2, touched=None) -> None:
    """Eager: :func:`step_rows_in_place`, then the options that act on the stepped rows:
    stochastic rounding (fp16/bf16 tables, ``ROUNDING_HPARAMS``), then ``max_norm``
    (``hparams[MAX_NORM]``, where set), touched rows only (see ``jaggedrec.optim.fused``).

    State kept in fp16/bf16 (the config's ``state_dtype``) is stepped as fp32 copies and
    written back rounded to nearest; the rows' update reads the fp32 values, before rounding.
    """
    wide = [None if s is None else s.float() for s in (s1, s2)]
    step_rows_in_place(rule, w, g, *wide, touched)
    for s, f in zip((s1, s2), wide):
        if f is not s:  # fp16/bf16 state (float() of an fp32 tensor is the tensor itself)
            s.copy_(f)
    hparams = rule.hparams
    if len(hparams) >= ROUNDING_HPARAMS.stop and hparams[ROUNDING_HPARAMS.start]:
        rounded = stochastic_round(w, hparams[ROUNDING_HPARAMS.start], hparams[ROUNDING_HPARAMS.start + 1], rule.step)
        w.copy_(rounded if touched is None else torch.where(touched.unsqueeze(1), rounded, w))
    max_norm = hparams[MAX_NORM] if len(hparams) > MAX_NORM else 0.0
    if max_norm > 0:
        renormalise_in_place(w, max_norm, touched)


def step_rows_in_place(rule: StepRule, w, g, s1, s2, touched=None) -> None:
    """Eager: one optimizer step, in place, for rows ``w`` (``[n, D]`` fp32) with summed
    gradients ``g`` (``[n, D]`` fp32, overwritten) and state ``s1``, ``s2`` (fp32, updated).

    In few passes over the chunk: in-place ops, no temporaries of ``[n, D]`` but one.
    ``touched``: ``[n]`` bool, None when all rows were touched; untouched rows (zero
    gradient) come out bit for bit as they were: no weight decay, no step, no moment decay.
    ``hparams[MAX_GRADIENT]`` was applied to the output gradient before.
    """
    optimizer, hparams, step = rule
    if optimizer in fused_rules_rowwise.ROW_SUMS:
        fused_rules_rowwise.step_in_place(optimizer, hparams, step, w, g, s1, s2, touched)
    elif optimizer == ROWWISE_ADAGRAD_COUNTER:
        fused_rules_counter.step_in_place(hparams, step, w, g, s1, s2, touched)
    else:
        fused_rules_elementwise.step_in_place(optimizer, hparams, step, w, g, s1, s2, touched)


def step_rows(optimizer, w, g, s1, s2, hparams, t):
    """:func:`step_rows_functional`, then stochastic rounding and ``max_norm``, every row
    touched. State in fp16/bf16 is read as fp32 and returned in fp32: the caller stores it
    rounded."""
    w, s1, s2 = step_rows_functional(optimizer, w, g, *(None if s is None else s.float() for s in (s1, s2)),
                                     hparams, t)
    if len(hparams) >= ROUNDING_HPARAMS.stop:
        w = stochastic_round(w, hparams[ROUNDING_HPARAMS.start], hparams[ROUNDING_HPARAMS.start + 1], t)
    return renormalised(w, hparams), s1, s2


def step_rows_functional(optimizer, w, g, s1, s2, hparams, t):
    """One optimizer step for rows ``w`` (``[n, D]`` fp32) with summed gradients ``g``, as
    functional ops that Inductor fuses (static path; the eager one steps in place, see
    :func:`step_in_place`). ``hparams`` (lr, eps, weight_decay, beta1, beta2, ...) and the step
    ``t`` are 0-d tensors. Returns the new ``(w, s1, s2)``.
    """
    if optimizer in fused_rules_rowwise.ROW_SUMS:
        return fused_rules_rowwise.stepped(optimizer, w, g, s1, s2, hparams, t)
    if optimizer == ROWWISE_ADAGRAD_COUNTER:
        return fused_rules_counter.stepped(w, g, s1, s2, hparams, t)
    return fused_rules_elementwise.stepped(optimizer, w, g, s1, s2, hparams, t)
