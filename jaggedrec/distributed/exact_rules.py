"""The step of a fused optimizer that reads sums over whole rows, for one column block of rows.

A column block of a table cannot take such a step alone: row-wise Adagrad's state is the
mean of the whole row's squared gradient, LARS-SGD's and LAMB's trust ratios are whole-row
norms. The step is cut in two around those sums: :func:`row_partials` gives the block's part
of each row's sums (``[n, k]``), the caller adds every block's parts up (``exact_columns``),
and :func:`finish_rows` steps the block with the whole rows' sums. With one block holding
the whole row, the two give the step of ``ops/fused_rules.step_in_place`` on touched rows
(same formulas; a sum over the columns divided by the dim stands for its ``mean``).

Partial row-wise LAMB needs the row's new second moment before its direction's norm; both
come from one exchange by expanding ``|m / d + wd * w|^2`` into the row sums of ``m^2``,
``m * w`` and ``w^2`` (``m``: the bias-corrected first moment, ``d`` the row's denominator).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from jaggedrec.optim.fused import (LAMB_KIND, LARS_SGD_KIND, PARTIAL_ROWWISE_ADAM_KIND, PARTIAL_ROWWISE_LAMB_KIND,
                                   ROWWISE_ADAGRAD_DECOUPLED_KIND, ROWWISE_ADAGRAD_KIND)

#: the optimizers stepped here, and how many row sums each exchanges
ROW_SUMS = {ROWWISE_ADAGRAD_KIND: 1, ROWWISE_ADAGRAD_DECOUPLED_KIND: 1, PARTIAL_ROWWISE_ADAM_KIND: 1,
            LARS_SGD_KIND: 2, LAMB_KIND: 2, PARTIAL_ROWWISE_LAMB_KIND: 4}


def row_partials(kind: int, hparams: Sequence[float], step: int, w: torch.Tensor, g: torch.Tensor,
                 s1: Optional[torch.Tensor], s2: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """This block's part of each row's sums, and what :func:`finish_rows` carries on with.

    Args:
        kind: the optimizer (``jaggedrec.optim.fused``'s kinds, a key of ``ROW_SUMS``).
        hparams: lr, eps, weight_decay, beta1, beta2 (LARS-SGD: momentum, eta).
        step: the step count, this step included.
        w: ``[n, c]`` fp32 rows of the block; g: ``[n, c]`` fp32 their summed gradients
            (row-wise Adagrad adds its L2 weight decay to them here).
        s1, s2: the rows' state (``[n]`` row-wise, ``[n, c]`` element-wise); LAMB's element-wise
            moments move here.
    Returns:
        ``[n, ROW_SUMS[kind]]`` fp32 partial sums, and a ``[n, c]`` tensor or None.
    """
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]
    if kind == ROWWISE_ADAGRAD_KIND:
        if weight_decay:
            g.add_(w * weight_decay)  # one rounding of wd * w, as fused_rules
        return g.square().sum(1, keepdim=True), None
    if kind in (ROWWISE_ADAGRAD_DECOUPLED_KIND, PARTIAL_ROWWISE_ADAM_KIND):
        return g.square().sum(1, keepdim=True), None
    if kind == LARS_SGD_KIND:
        return torch.stack([w.square().sum(1), g.square().sum(1)], 1), None
    if kind == LAMB_KIND:
        s2.lerp_(g.square(), 1 - beta2)
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
        s1.lerp_(g, 1 - beta1)
        direction = torch.div(s1, 1 - beta1 ** step).div_(denominator)
        if weight_decay:
            direction.add_(w * weight_decay)
        return torch.stack([w.square().sum(1), direction.square().sum(1)], 1), direction
    if kind == PARTIAL_ROWWISE_LAMB_KIND:
        squares = g.square().sum(1)
        s1.lerp_(g, 1 - beta1)
        moment = torch.div(s1, 1 - beta1 ** step)
        return torch.stack([squares, moment.square().sum(1), (moment * w).sum(1), w.square().sum(1)], 1), moment
    raise ValueError(f"optimizer kind {kind} reads no whole-row sums")


def finish_rows(kind: int, hparams: Sequence[float], step: int, dim: int, w: torch.Tensor, g: torch.Tensor,
                s1: Optional[torch.Tensor], s2: Optional[torch.Tensor], sums: torch.Tensor,
                carried: Optional[torch.Tensor]) -> None:
    """Step the block's rows in place, given the whole rows' sums.

    Args:
        dim: the table's whole row width (a mean is a sum over ``dim`` columns).
        sums: ``[n, ROW_SUMS[kind]]``, every block's :func:`row_partials` added up.
        carried: what :func:`row_partials` returned beside them; the rest as there.
    """
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]
    if kind in (ROWWISE_ADAGRAD_KIND, ROWWISE_ADAGRAD_DECOUPLED_KIND):
        s1.add_(sums[:, 0] / dim)
        step_size = lr / (s1.sqrt() + eps)
        if kind == ROWWISE_ADAGRAD_DECOUPLED_KIND:
            w.mul_(1 - lr * weight_decay)
        w.addcmul_(g, step_size.unsqueeze(1), value=-1)
    elif kind == PARTIAL_ROWWISE_ADAM_KIND:
        s2.lerp_(sums[:, 0] / dim, 1 - beta2)
        s1.lerp_(g, 1 - beta1)
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
        update = torch.div(s1, 1 - beta1 ** step).div_(denominator.unsqueeze(1))
        if weight_decay:
            update.add_(w * weight_decay)
        w.sub_(update.mul_(lr))
    elif kind == LARS_SGD_KIND:  # beta1, beta2: momentum, eta
        weight_norm = sums[:, 0].sqrt()
        scale = weight_norm.mul(lr * beta2).div_(sums[:, 1].sqrt().add_(weight_norm * weight_decay))
        if weight_decay:
            g.add_(w * weight_decay)
        s1.mul_(beta1)
        s1.addcmul_(g, scale.unsqueeze(1))
        w.sub_(s1)
    elif kind == LAMB_KIND:
        ratio = sums[:, 0].sqrt().div_(sums[:, 1].sqrt())
        w.sub_(carried.mul_(ratio.mul_(lr).unsqueeze(1)))
    elif kind == PARTIAL_ROWWISE_LAMB_KIND:
        s2.lerp_(sums[:, 0] / dim, 1 - beta2)
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)  # [n]
        # |m / d + wd * w|^2 from the row sums of m^2, m * w and w^2
        direction_norm = (sums[:, 1] / denominator.square() + (2 * weight_decay) * sums[:, 2] / denominator
                          + weight_decay * weight_decay * sums[:, 3]).clamp_(min=0).sqrt_()
        direction = carried.div_(denominator.unsqueeze(1))
        if weight_decay:
            direction.add_(w * weight_decay)
        ratio = sums[:, 3].sqrt().div_(direction_norm)
        w.sub_(direction.mul_(ratio.mul_(lr).unsqueeze(1)))
    else:
        raise ValueError(f"optimizer kind {kind} reads no whole-row sums")
