"""What the step rules of the torch path share: the optimizer kinds, their state layout and
the layout of the hyper-parameters tensor.

The kinds are the numbers ``jaggedrec.optim.fused`` gives its configs and the Triton kernel
(``kernels/pooled_fused.py``) takes as its ``OPTIMIZER``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

SGD, ROWWISE_ADAGRAD, ADAM, EXACT_ADAGRAD, LARS_SGD, PARTIAL_ROWWISE_ADAM = 1, 2, 3, 4, 5, 6
LAMB, PARTIAL_ROWWISE_LAMB, ROWWISE_ADAGRAD_DECOUPLED = 7, 8, 9
ROWWISE_ADAGRAD_COUNTER, ADAM_DECOUPLED, EXACT_ADAGRAD_DECOUPLED = 10, 11, 12
# each optimizer's state1, state2: values per table row ("row", [R], or [R, 2] for the
# counters: prev_iter, row_counter) or per element ([W])
STATE_LAYOUT = {SGD: (), ROWWISE_ADAGRAD: ("row",), ADAM: ("element", "element"), EXACT_ADAGRAD: ("element",),
                LARS_SGD: ("element",), PARTIAL_ROWWISE_ADAM: ("element", "row"), LAMB: ("element", "element"),
                PARTIAL_ROWWISE_LAMB: ("element", "row"), ROWWISE_ADAGRAD_DECOUPLED: ("row",),
                ROWWISE_ADAGRAD_COUNTER: ("row", "row"), ADAM_DECOUPLED: ("element", "element"),
                EXACT_ADAGRAD_DECOUPLED: ("element",)}

# The hyper-parameters, as jaggedrec.optim.fused.FusedOptimizer.hyperparameters lays them out:
# [lr, eps, weight_decay, beta1, beta2] (LARS-SGD: momentum and eta for the betas), then
# MAX_GRADIENT (applied to the output gradient before the step, inf: none) and MAX_NORM (0: off)
MAX_GRADIENT, MAX_NORM = 5, 6
# past MAX_NORM, the counter kind's: FBGEMM's regularization mode (3 COUNTER, 4 COWCLIP),
# counter weight-decay mode (0 none, 1 L2, 2 decoupled, 3 AdagradW), counter_halflife,
# adjustment_iter, adjustment_ub, learning_rate_mode (-1 equal, 2 counter SGD),
# tail_id_threshold, weight_norm_coefficient, lower_bound
COUNTER_HPARAMS = slice(7, 16)
# or stochastic rounding's: the table dtype's code (0 none: fp32 tables, 1 fp16, 2 bf16; the
# collection sets it per storage group) and the seed
ROUNDING_HPARAMS = slice(7, 9)


class StepRule(NamedTuple):
    """What a step does to a row: the optimizer, its hyper-parameters and the step count,
    read to the host where the update is eager, device tensors on the static path."""

    optimizer: int  # SGD ... EXACT_ADAGRAD_DECOUPLED
    # as laid out above: a list of floats, or a [5 or more] fp32 tensor
    hparams: Union[Sequence[float], torch.Tensor]
    step: Union[int, torch.Tensor]  # steps taken, this one included (or [1] int64)


def lerp_rate(beta, keep):
    """The weight a moment moves toward its new value by: ``1 - beta``, or 0 where ``keep``
    (the touched rows as 0/1 floats, shaped to broadcast) is 0: lazy moments leave untouched
    rows alone."""
    return 1 - beta if keep is None else keep * (1 - beta)
