"""The step rules of the optimizers that step a row by sums over all of its columns: row-wise
Adagrad (L2 and decoupled weight decay: its state is the mean of the row's squared gradient),
partial row-wise Adam (its second moment is), LARS-SGD and LAMB (their trust ratios are
whole-row norms) and partial row-wise LAMB (both). See ``jaggedrec.optim.fused`` for the
formulas; row-wise Adagrad's COUNTER and COWCLIP modes are ``fused_rules_counter``'s.

The eager step is cut in two around those sums, so that a column block of the rows can take
it too (``distributed/exact_columns``): :func:`row_partials` gives the block's part of each
row's sums (``[n, ROW_SUMS[kind]]``), the caller adds every block's parts up, and
:func:`finish_rows` steps the block with the whole rows' sums. :func:`step_in_place` is the
two on whole rows. A sum over the columns divided by the dim stands for a ``mean`` (the same
bits on CPU). :func:`stepped` is the functional form of the static path.

Partial row-wise LAMB needs the row's new second moment before its direction's norm; over
column blocks both come from one exchange by expanding ``|m / d + wd * w|^2`` into the row
sums of ``m^2``, ``m * w`` and ``w^2`` (``m``: the bias-corrected first moment, ``d`` the row's
denominator). On whole rows the norm is summed from the direction itself.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from jaggedrec.ops.fused_rules_kinds import (LAMB, LARS_SGD, PARTIAL_ROWWISE_ADAM, PARTIAL_ROWWISE_LAMB,
                                             ROWWISE_ADAGRAD, ROWWISE_ADAGRAD_DECOUPLED, lerp_rate)
from jaggedrec.ops.fused_rules_options import add_l2_decay, step_decoupled

#: the optimizers stepped here, and how many row sums each exchanges over column blocks
ROW_SUMS = {ROWWISE_ADAGRAD: 1, ROWWISE_ADAGRAD_DECOUPLED: 1, PARTIAL_ROWWISE_ADAM: 1, LARS_SGD: 2, LAMB: 2,
            PARTIAL_ROWWISE_LAMB: 4}


def row_partials(kind: int, hparams: Sequence[float], step: int, w: torch.Tensor, g: torch.Tensor,
                 s1: Optional[torch.Tensor], s2: Optional[torch.Tensor], touched: Optional[torch.Tensor] = None,
                 whole: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """These columns' part of each row's sums, and what :func:`finish_rows` carries on with.

    Args:
        kind: the optimizer (a key of ``ROW_SUMS``).
        hparams: lr, eps, weight_decay, beta1, beta2 (LARS-SGD: momentum, eta).
        step: the step count, this step included.
        w: ``[n, c]`` fp32 rows (or a column block of them); g: ``[n, c]`` fp32 their summed
            gradients (row-wise Adagrad adds its L2 weight decay to them here).
        s1, s2: the rows' state (``[n]`` row-wise, ``[n, c]`` element-wise); the element-wise
            moments that only the gradient moves (LAMB's) move here.
        touched: ``[n]`` bool, None when all rows were touched; an untouched row (zero
            gradient) comes out of the step bit for bit as it was, state included.
        whole: ``w`` holds whole rows (then partial row-wise LAMB sums its direction itself).
    Returns:
        ``[n, ROW_SUMS[kind]]`` fp32 partial sums (``[n, 1]`` for partial row-wise LAMB with
        ``whole``), and a ``[n, c]`` tensor or None.
    """
    _, eps, weight_decay, beta1, beta2 = hparams[:5]
    if kind == ROWWISE_ADAGRAD:
        add_l2_decay(g, w, weight_decay, touched)
        return g.square().sum(1, keepdim=True), None
    if kind in (ROWWISE_ADAGRAD_DECOUPLED, PARTIAL_ROWWISE_ADAM):
        return g.square().sum(1, keepdim=True), None
    if kind == LARS_SGD:
        return torch.stack([w.square().sum(1), g.square().sum(1)], 1), None
    keep = None if touched is None else touched.to(w.dtype).unsqueeze(1)
    if kind == LAMB:
        s2.lerp_(g.square(), lerp_rate(beta2, keep))
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
        s1.lerp_(g, lerp_rate(beta1, keep))
        direction = torch.div(s1, 1 - beta1 ** step).div_(denominator)
        if weight_decay:
            direction.add_(w * weight_decay)
        return torch.stack([w.square().sum(1), direction.square().sum(1)], 1), direction
    if kind == PARTIAL_ROWWISE_LAMB:
        squares = g.square().sum(1)
        s1.lerp_(g, lerp_rate(beta1, keep))
        moment = torch.div(s1, 1 - beta1 ** step)
        if whole:
            return squares.unsqueeze(1), moment
        return torch.stack([squares, moment.square().sum(1), (moment * w).sum(1), w.square().sum(1)], 1), moment
    raise ValueError(f"optimizer kind {kind} reads no whole-row sums")


def finish_rows(kind: int, hparams: Sequence[float], step: int, dim: int, w: torch.Tensor, g: torch.Tensor,
                s1: Optional[torch.Tensor], s2: Optional[torch.Tensor], sums: torch.Tensor,
                carried: Optional[torch.Tensor], touched: Optional[torch.Tensor] = None, whole: bool = False) -> None:
    """Step the rows (or the block's columns of them) in place, given the whole rows' sums.

    Args:
        dim: the table's whole row width (a mean is a sum over ``dim`` columns).
        sums: ``[n, k]``, every block's :func:`row_partials` added up.
        carried: what :func:`row_partials` returned beside them; the rest as there.
    """
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]
    if kind in (ROWWISE_ADAGRAD, ROWWISE_ADAGRAD_DECOUPLED):
        s1.add_(sums[:, 0] / dim)
        step_size = lr / (s1.sqrt() + eps)
        if touched is not None:  # with eps 0, a never-touched row's step size is inf, and inf * 0 NaN
            step_size = torch.where(touched, step_size, 0.0)
        if kind == ROWWISE_ADAGRAD_DECOUPLED:  # FBGEMM's DECOUPLE: the row decays beside the step
            w.mul_(1 - lr * weight_decay if touched is None
                   else torch.where(touched, 1 - lr * weight_decay, 1.0).unsqueeze(1))
        w.addcmul_(g, step_size.unsqueeze(1), value=-1)
        return
    keep = None if touched is None else touched.to(w.dtype)
    if kind == PARTIAL_ROWWISE_ADAM:
        s2.lerp_(sums[:, 0] / dim, lerp_rate(beta2, keep))
        s1.lerp_(g, lerp_rate(beta1, None if keep is None else keep.unsqueeze(1)))
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
        step_decoupled(w, torch.div(s1, 1 - beta1 ** step).div_(denominator.unsqueeze(1)), lr, weight_decay, touched)
    elif kind == LARS_SGD:  # beta1, beta2: momentum, eta
        weight_norm = sums[:, 0].sqrt()
        scale = weight_norm.mul(lr * beta2).div_(sums[:, 1].sqrt().add_(weight_norm * weight_decay))
        if weight_decay:
            g.add_(w * weight_decay)
        if touched is not None:  # untouched: 0 / 0 above; no scale, no momentum decay, no step
            scale = torch.where(touched, scale, 0.0)
            s1.mul_(torch.where(touched, beta1, 1.0).unsqueeze(1))
        else:
            s1.mul_(beta1)
        s1.addcmul_(g, scale.unsqueeze(1))
        w.sub_(s1 if touched is None else torch.where(touched.unsqueeze(1), s1, 0.0))
    elif kind == LAMB:
        _step_by_ratio(w, carried, sums[:, 0].sqrt().div_(sums[:, 1].sqrt()), lr, touched)
    elif kind == PARTIAL_ROWWISE_LAMB:
        s2.lerp_(sums[:, 0] / dim, lerp_rate(beta2, keep))
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)  # [n]
        direction = carried.div_(denominator.unsqueeze(1))
        if weight_decay:
            direction.add_(w * weight_decay)
        if whole:
            ratio = w.square().sum(1).sqrt_().div_(direction.square().sum(1).sqrt_())
        else:  # |m / d + wd * w|^2 from the row sums of m^2, m * w and w^2
            direction_norm = (sums[:, 1] / denominator.square() + (2 * weight_decay) * sums[:, 2] / denominator
                              + weight_decay * weight_decay * sums[:, 3]).clamp_(min=0).sqrt_()
            ratio = sums[:, 3].sqrt().div_(direction_norm)
        _step_by_ratio(w, direction, ratio, lr, touched)
    else:
        raise ValueError(f"optimizer kind {kind} reads no whole-row sums")


def _step_by_ratio(w, direction, ratio, lr, touched) -> None:
    """LAMB's step: ``w -= lr * ratio * direction`` (``ratio``: the row's trust ratio, ``[n]``,
    consumed), touched rows only (their direction may be 0 / 0)."""
    direction.mul_(ratio.mul_(lr).unsqueeze(1))
    if touched is not None:
        direction = torch.where(touched.unsqueeze(1), direction, 0.0)
    w.sub_(direction)


def step_in_place(kind: int, hparams: Sequence[float], step: int, w, g, s1, s2, touched=None) -> None:
    """One step of whole rows ``w`` (``[n, D]`` fp32) with summed gradients ``g`` (``[n, D]``,
    overwritten): :func:`row_partials` and :func:`finish_rows` on the rows at hand."""
    sums, carried = row_partials(kind, hparams, step, w, g, s1, s2, touched, whole=True)
    finish_rows(kind, hparams, step, w.shape[1], w, g, s1, s2, sums, carried, touched, whole=True)


def stepped(kind: int, w, g, s1, s2, hparams, t):
    """:func:`step_in_place` as functional ops that Inductor fuses (every row touched);
    ``hparams`` and ``t`` 0-d tensors. Returns the new ``(w, s1, s2)``."""
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]
    if kind == LARS_SGD:  # beta1, beta2: momentum, eta
        weight_norm = w.square().sum(1).sqrt()
        scale = lr * beta2 * weight_norm / (g.square().sum(1).sqrt() + weight_decay * weight_norm)
        s1 = beta1 * s1 + scale.unsqueeze(1) * (g + weight_decay * w)
        return w - s1, s1, s2
    if kind in (LAMB, PARTIAL_ROWWISE_LAMB):
        s1 = beta1 * s1 + (1 - beta1) * g
        if kind == LAMB:
            s2 = beta2 * s2 + (1 - beta2) * g.square()
            denominator = (s2 / (1 - beta2 ** t)).sqrt() + eps
        else:
            s2 = beta2 * s2 + (1 - beta2) * g.square().mean(1)
            denominator = ((s2 / (1 - beta2 ** t)).sqrt() + eps).unsqueeze(1)
        direction = s1 / (1 - beta1 ** t) / denominator + weight_decay * w
        ratio = w.square().sum(1).sqrt() / direction.square().sum(1).sqrt()
        return w - (lr * ratio).unsqueeze(1) * direction, s1, s2
    if kind == PARTIAL_ROWWISE_ADAM:
        s1 = beta1 * s1 + (1 - beta1) * g
        s2 = beta2 * s2 + (1 - beta2) * g.square().mean(1)
        denominator = ((s2 / (1 - beta2 ** t)).sqrt() + eps).unsqueeze(1)
        return w - lr * (s1 / (1 - beta1 ** t) / denominator + weight_decay * w), s1, s2
    if kind == ROWWISE_ADAGRAD_DECOUPLED:
        s1 = s1 + g.square().mean(1)
        return (1 - lr * weight_decay) * w - (lr / (s1.sqrt() + eps)).unsqueeze(1) * g, s1, s2
    g = g + weight_decay * w
    s1 = s1 + g.square().mean(1)
    return w - (lr / (s1.sqrt() + eps)).unsqueeze(1) * g, s1, s2
