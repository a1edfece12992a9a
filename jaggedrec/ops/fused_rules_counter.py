"""Row-wise Adagrad with FBGEMM's COUNTER or COWCLIP regularization: per-row counters
(``prev_iter``, ``row_counter``, ``[n, 2]`` in ``s2``) scale the step and the weight decay
(see ``jaggedrec.optim.fused.CounterRegularization``). The Triton kernel's
``_counter_factors`` makes the same factors in fp32, as FBGEMM's GPU step does.
"""

from __future__ import annotations

import math

import torch

from jaggedrec.ops.fused_rules_kinds import COUNTER_HPARAMS


def step_in_place(hparams, step: int, w, g, s1, s2, touched=None) -> None:
    """Eager: one step of rows ``w`` (``[n, D]`` fp32) with summed gradients ``g``, sums of
    mean squares ``s1`` (``[n]``) and counters ``s2`` (``[n, 2]``), in place; untouched rows
    (``touched`` ``[n]`` bool, None: all touched): no decay, no step, counters as they were."""
    multiplier, correction, new_s1, new_s2 = counter_factors(w, g, s1, s2, hparams, step)
    if touched is not None:
        multiplier = torch.where(touched, multiplier, 0.0)
        correction = torch.where(touched, correction, 1.0)
        new_s1, new_s2 = torch.where(touched, new_s1, s1), torch.where(touched.unsqueeze(1), new_s2, s2)
    s1.copy_(new_s1)
    s2.copy_(new_s2)
    w.mul_(correction.unsqueeze(1)).addcmul_(g, multiplier.unsqueeze(1), value=-1)


def stepped(w, g, s1, s2, hparams, t):
    """Static: :func:`step_in_place` as functional ops, every row touched. Returns the new
    ``(w, s1, s2)``."""
    multiplier, correction, s1, s2 = counter_factors(w, g, s1, s2, hparams, t)
    return correction.unsqueeze(1) * w - multiplier.unsqueeze(1) * g, s1, s2


def counter_factors(w, g, s1, s2, hparams, step):
    """Row-wise Adagrad with FBGEMM's COUNTER or COWCLIP regularization: per row, the
    multiplier of the gradient and the correction of the weight (``w = correction * w -
    multiplier * g``), the new sum of mean squares and the new ``[prev_iter, row_counter]``.

    The per-row factors are worked out in float64 and rounded once, as FBGEMM's CPU step
    does in double: a correction applied at every step, rounded each time in fp32, would
    drift the rows by an ulp a step.

    Args:
        w, g: ``[n, D]`` fp32 rows and their summed gradients (read only); s1 ``[n]``, s2
            ``[n, 2]`` their state (read only).
        hparams: as :data:`COUNTER_HPARAMS` says, floats (eager) or 0-d tensors (static).
        step: this step's number (FBGEMM's ``iter``), an int or a ``[1]`` tensor.
    Returns:
        ``([n], [n], [n], [n, 2])`` fp32.
    """
    f64 = torch.float64
    lr, eps, weight_decay = (torch.as_tensor(x, dtype=f64) for x in hparams[:3])
    reg, decay_mode, halflife, adjustment_iter, adjustment_ub, lr_mode, tail, norm_coefficient, lower = (
        torch.as_tensor(x, dtype=f64) for x in hparams[COUNTER_HPARAMS])
    it = torch.as_tensor(step, dtype=f64)
    prev, counter = s2.to(f64).unbind(1)
    # a row seen at an earlier step decays its counter by the steps since (halflife > 0)
    delta = torch.where(prev == 0, 1.0, it - prev)
    decayed = torch.exp(delta * (-math.log(2.0) / halflife)) * counter + 1
    counter = torch.where(halflife > 0, decayed, torch.where(halflife == 0, 1.0, counter + 1)).float().to(f64)
    freq = halflife / counter
    l2 = decay_mode == 1  # an L2 term enters the squares only; the step takes the bare gradient
    squares = torch.where(l2, g + weight_decay.float() * w, g).square().sum(1)  # fp32, as FBGEMM's
    s1 = s1 + squares / w.shape[1]
    root = s1.to(f64).sqrt()
    multiplier = lr / (root + eps)
    adjusting = (adjustment_iter <= 0) | (it > adjustment_iter)
    # COUNTER: learning_rate_mode COUNTER_SGD (2) steps rows past the tail threshold by their counter
    counter_sgd = (lr_mode == 2) & adjusting & (counter > tail)
    counter_multiplier = torch.where(counter_sgd, lr / ((adjustment_ub * counter).sqrt() + eps), multiplier)
    # AdagradW: its own multiplier, and the decay of the steps the row missed applied at once
    # (rounded to fp32 where FBGEMM's CPU step keeps fp32 values)
    adagradw = torch.where(halflife == -1, multiplier * counter.sqrt(), torch.where(
        halflife == -2, torch.minimum(lr * counter, adjustment_ub) / (root + eps), counter_multiplier)).float()
    base = 1 - weight_decay * lr
    lazy = base.float() ** (torch.minimum(delta, it - adjustment_iter) - 1).float()
    counter_multiplier = torch.where(adjusting & (decay_mode == 3), (adagradw * lazy).to(f64), counter_multiplier)
    counter_correction = torch.where(~adjusting, 1.0, torch.where(decay_mode == 3, (base.float() * lazy).to(f64), torch.where(
        decay_mode == 2, 1 - freq * weight_decay * lr, torch.where(l2, 1 - freq * weight_decay * multiplier, 1.0))))
    # COWCLIP: the gradient's norm clipped to the counter times the row's (bounded) norm
    clip = counter * torch.maximum(norm_coefficient * w.square().sum(1).to(f64).sqrt(), lower)
    norm = squares.to(f64).sqrt()
    cowclip_multiplier = torch.where(norm > 0, torch.clamp(clip / norm, max=1.0), 1.0) * multiplier
    cowclip_multiplier = cowclip_multiplier.float().to(f64)  # FBGEMM keeps it in fp32 before the L2 decay reads it
    cowclip_correction = torch.where(decay_mode == 2, base, torch.where(l2, 1 - weight_decay * cowclip_multiplier, 1.0))
    cowclip = reg == 4
    return (torch.where(cowclip, cowclip_multiplier, counter_multiplier).float(),
            torch.where(cowclip, cowclip_correction, counter_correction).float(),
            s1, torch.stack([it.expand_as(prev), counter], 1).float())
