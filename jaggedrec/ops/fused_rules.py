"""The optimizer step rules of the torch path: what one fused step does to a block of rows.

:func:`step_in_place` steps gathered or streamed rows eagerly, in place, in few passes over
them; :func:`step_rows` is the same step as functional ops for the static (compiled, off-CPU)
path. ``fused_torch`` decides which rows are stepped and sums their gradients; the Triton
kernel (``kernels/pooled_fused.py``) implements the same rules.
"""

from __future__ import annotations

import math
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
# hparams of the counter kind past [lr, eps, weight_decay, beta1, beta2, max_gradient, max_norm]
# (see jaggedrec.optim.fused.RowWiseAdagrad): FBGEMM's regularization mode (3 COUNTER, 4 COWCLIP),
# counter weight-decay mode (0 none, 1 L2, 2 decoupled, 3 AdagradW), counter_halflife,
# adjustment_iter, adjustment_ub, learning_rate_mode (-1 equal, 2 counter SGD),
# tail_id_threshold, weight_norm_coefficient, lower_bound
COUNTER_HPARAMS = slice(7, 16)


class StepRule(NamedTuple):
    """What a step does to a row: the optimizer, its hyper-parameters and the step count,
    read to the host where the update is eager, device tensors on the static path."""

    optimizer: int  # SGD ... PARTIAL_ROWWISE_ADAM
    # lr, eps, weight_decay, beta1, beta2 (LARS-SGD: momentum, eta), or [5] fp32
    hparams: Union[Sequence[float], torch.Tensor]
    step: Union[int, torch.Tensor]  # steps taken, this one included (or [1] int64)


def step_in_place(rule: StepRule, w, g, s1, s2, touched=None) -> None:
    """Eager: :func:`step_rows_in_place`, then the rows past ``max_norm`` (``hparams[6]``, where
    set) scaled down to it, touched rows only (see ``jaggedrec.optim.fused``).

    State kept in fp16/bf16 (the config's ``state_dtype``) is stepped as fp32 copies and
    written back rounded to nearest; the rows' update reads the fp32 values, before rounding.
    """
    wide = [None if s is None else s.float() for s in (s1, s2)]
    step_rows_in_place(rule, w, g, *wide, touched)
    for s, f in zip((s1, s2), wide):
        if f is not s:  # fp16/bf16 state (float() of an fp32 tensor is the tensor itself)
            s.copy_(f)
    if len(rule.hparams) > ROUNDING_HPARAMS.stop - 1 and rule.hparams[7]:
        rounded = stochastic_round(w, rule.hparams[7], rule.hparams[8], rule.step)
        w.copy_(rounded if touched is None else torch.where(touched.unsqueeze(1), rounded, w))
    max_norm = rule.hparams[6] if len(rule.hparams) > 6 else 0.0
    if max_norm > 0:
        norm = w.square().sum(1).sqrt_()
        scale = torch.where(norm > max_norm, max_norm / norm, 1.0)
        if touched is not None:
            scale = torch.where(touched, scale, 1.0)
        w.mul_(scale.unsqueeze(1))


def _renormalised(w, hparams):
    """Static: rows past ``max_norm`` (``hparams[6]``, 0: off) scaled down to it."""
    if len(hparams) <= 6:
        return w
    max_norm = hparams[6]
    norm = w.square().sum(1).sqrt()
    return w * torch.where((max_norm > 0) & (norm > max_norm), max_norm / norm, 1.0).unsqueeze(1)


def step_rows_in_place(rule: StepRule, w, g, s1, s2, touched=None) -> None:
    """Eager: one optimizer step, in place, for rows ``w`` (``[n, D]`` fp32) with summed
    gradients ``g`` (``[n, D]`` fp32, overwritten) and state ``s1``, ``s2`` (updated).

    The formulas of :func:`step_rows`, in fewer passes over the chunk: in-place ops, no
    temporaries of ``[n, D]`` but one. ``touched``: ``[n]`` bool, None when all rows were
    touched; untouched rows (zero gradient) come out bit for bit as they were: no weight
    decay, no step, no moment decay.
    """
    optimizer, hparams, step = rule
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]  # [5]: max_gradient, applied to grad_out before
    if optimizer == SGD:
        w.add_(g, alpha=-lr)
        return
    if optimizer == LARS_SGD:
        _lars_in_place(lr, weight_decay, beta1, beta2, w, g, s1, touched)
        return
    if optimizer == PARTIAL_ROWWISE_ADAM:
        _partial_rowwise_adam_in_place(lr, eps, weight_decay, beta1, beta2, step, w, g, s1, s2, touched)
        return
    if optimizer in (LAMB, PARTIAL_ROWWISE_LAMB):
        _lamb_in_place(optimizer == PARTIAL_ROWWISE_LAMB, lr, eps, weight_decay, beta1, beta2, step, w, g, s1, s2,
                       touched)
        return
    if optimizer == ROWWISE_ADAGRAD_COUNTER:
        multiplier, correction, new_s1, new_s2 = counter_factors(w, g, s1, s2, hparams, step)
        if touched is not None:  # untouched rows: no decay, no step, counters as they were
            multiplier = torch.where(touched, multiplier, 0.0)
            correction = torch.where(touched, correction, 1.0)
            new_s1, new_s2 = torch.where(touched, new_s1, s1), torch.where(touched.unsqueeze(1), new_s2, s2)
        s1.copy_(new_s1)
        s2.copy_(new_s2)
        w.mul_(correction.unsqueeze(1)).addcmul_(g, multiplier.unsqueeze(1), value=-1)
        return
    if optimizer in (ADAM_DECOUPLED, EXACT_ADAGRAD_DECOUPLED):
        _decoupled_in_place(optimizer, lr, eps, weight_decay, beta1, beta2, step, w, g, s1, s2, touched)
        return
    if optimizer == ROWWISE_ADAGRAD_DECOUPLED:  # FBGEMM's DECOUPLE: the row decays beside the step
        s1.add_(g.square().mean(1))
        step_size = lr / (s1.sqrt() + eps)
        if touched is not None:  # untouched rows: no decay, no step
            step_size = torch.where(touched, step_size, 0.0)
            w.mul_(torch.where(touched, 1 - lr * weight_decay, 1.0).unsqueeze(1))
        else:
            w.mul_(1 - lr * weight_decay)
        w.addcmul_(g, step_size.unsqueeze(1), value=-1)
        return
    if weight_decay:
        # one rounding of wd * w on both paths: add_(w, alpha=wd) may fuse the multiply into the
        # add (one rounding less) where addcmul_ does not, and streamed and scattered rows then
        # differ in the last bit
        decay = w * weight_decay
        if touched is not None:
            decay.mul_(touched.unsqueeze(1))
        g.add_(decay)
    if optimizer == ROWWISE_ADAGRAD:
        s1.add_(g.square().mean(1))
        step_size = lr / (s1.sqrt() + eps)
        if touched is not None:  # with eps 0, a never-touched row's step size is inf, and inf * 0 NaN
            step_size = torch.where(touched, step_size, 0.0)
        w.addcmul_(g, step_size.unsqueeze(1), value=-1)
        return
    if optimizer == EXACT_ADAGRAD:
        s1.addcmul_(g, g)
        denominator = s1.sqrt().add_(eps)
        if touched is not None:  # an untouched row steps by 0 / inf: none, even with eps 0 and no state
            denominator.masked_fill_(~touched.unsqueeze(1), math.inf)
        w.addcdiv_(g, denominator, value=-lr)
        return
    # Adam: moments move toward g by lerp, whose weight is 0 for untouched rows (lazy Adam
    # leaves their moments alone), and their step divides by an infinite denominator
    keep = None if touched is None else touched.unsqueeze(1).to(w.dtype)
    s1.lerp_(g, 1 - beta1 if keep is None else keep * (1 - beta1))
    s2.lerp_(g.square_(), 1 - beta2 if keep is None else keep * (1 - beta2))
    denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
    if touched is not None:
        denominator.masked_fill_(~touched.unsqueeze(1), math.inf)
    w.addcdiv_(s1, denominator, value=-lr / (1 - beta1 ** step))


def _decoupled_in_place(optimizer, lr, eps, weight_decay, beta1, beta2, step, w, g, s1, s2, touched) -> None:
    """Adam and exact Adagrad with decoupled weight decay (AdamW-style, FBGEMM's form of it):
    the state takes the bare gradient, and ``w -= lr * (update + weight_decay * w)``."""
    if optimizer == EXACT_ADAGRAD_DECOUPLED:
        s1.addcmul_(g, g)
        update = torch.div(g, s1.sqrt().add_(eps))
    else:
        keep = None if touched is None else touched.unsqueeze(1).to(w.dtype)
        s1.lerp_(g, 1 - beta1 if keep is None else keep * (1 - beta1))
        s2.lerp_(g.square(), 1 - beta2 if keep is None else keep * (1 - beta2))
        update = torch.div(s1, 1 - beta1 ** step).div_(s2.div(1 - beta2 ** step).sqrt_().add_(eps))
    if weight_decay:
        update.add_(w * weight_decay)
    if touched is not None:  # untouched rows: no step (nor 0 / 0 with eps 0 and no state)
        update = torch.where(touched.unsqueeze(1), update, 0.0)
    w.sub_(update.mul_(lr))


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


def _lars_in_place(lr, weight_decay, momentum, eta, w, g, s1, touched) -> None:
    """LARS-SGD (see :func:`step_in_place`): the row's trust ratio from its weight and
    gradient norms scales the step; the momentum moves only for touched rows."""
    weight_norm = w.square().sum(1).sqrt_()
    scale = weight_norm.mul(lr * eta).div_(g.square().sum(1).sqrt_().add_(weight_norm * weight_decay))
    if weight_decay:
        g.add_(w * weight_decay)
    if touched is not None:  # untouched: 0 / 0 above; no scale, no momentum decay, no step
        scale = torch.where(touched, scale, 0.0)
        s1.mul_(torch.where(touched, momentum, 1.0).unsqueeze(1))
    else:
        s1.mul_(momentum)
    s1.addcmul_(g, scale.unsqueeze(1))
    w.sub_(s1 if touched is None else torch.where(touched.unsqueeze(1), s1, 0.0))


def _partial_rowwise_adam_in_place(lr, eps, weight_decay, beta1, beta2, step, w, g, s1, s2, touched) -> None:
    """Partial row-wise Adam (see :func:`step_in_place`): element-wise first moments, one
    second moment per row (the mean square of the row's gradient), decoupled weight decay."""
    keep = None if touched is None else touched.to(w.dtype)
    s2.lerp_(g.square().mean(1), 1 - beta2 if keep is None else keep * (1 - beta2))
    s1.lerp_(g, 1 - beta1 if keep is None else keep.unsqueeze(1) * (1 - beta1))
    denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
    update = torch.div(s1, 1 - beta1 ** step).div_(denominator.unsqueeze(1))
    if weight_decay:
        update.add_(w * weight_decay)
    if touched is not None:  # untouched rows: no step (nor 0 / 0 with eps 0 and no state)
        update = torch.where(touched.unsqueeze(1), update, 0.0)
    w.sub_(update.mul_(lr))


def _lamb_in_place(partial, lr, eps, weight_decay, beta1, beta2, step, w, g, s1, s2, touched) -> None:
    """LAMB and partial row-wise LAMB (see :func:`step_in_place`): Adam's direction plus
    weight decay, scaled by the row's trust ratio ``|w| / |direction|``."""
    keep = None if touched is None else touched.to(w.dtype).unsqueeze(1)
    if partial:
        s2.lerp_(g.square().mean(1), 1 - beta2 if keep is None else keep.squeeze(1) * (1 - beta2))
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps).unsqueeze(1)
    else:
        s2.lerp_(g.square(), 1 - beta2 if keep is None else keep * (1 - beta2))
        denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
    s1.lerp_(g, 1 - beta1 if keep is None else keep * (1 - beta1))
    direction = torch.div(s1, 1 - beta1 ** step).div_(denominator)
    if weight_decay:
        direction.add_(w * weight_decay)
    ratio = w.square().sum(1).sqrt_().div_(direction.square().sum(1).sqrt_())
    direction.mul_(ratio.mul_(lr).unsqueeze(1))
    if touched is not None:  # untouched rows: no step (their direction may be 0 / 0)
        direction = torch.where(touched.unsqueeze(1), direction, 0.0)
    w.sub_(direction)


def step_rows(optimizer, w, g, s1, s2, hparams, t):
    """:func:`step_rows_functional`, then the rows past ``max_norm`` scaled down to it. State
    in fp16/bf16 is read as fp32 and returned in fp32: the caller stores it rounded."""
    w, s1, s2 = step_rows_functional(optimizer, w, g, *(None if s is None else s.float() for s in (s1, s2)),
                                     hparams, t)
    w = _renormalised(w, hparams)
    if len(hparams) > ROUNDING_HPARAMS.stop - 1:
        w = stochastic_round(w, hparams[7], hparams[8], t)
    return w, s1, s2


def step_rows_functional(optimizer, w, g, s1, s2, hparams, t):
    """One optimizer step for rows ``w`` (``[n, D]`` fp32) with summed gradients ``g``, as
    functional ops that Inductor fuses (static path; the eager one steps in place, see
    :func:`step_in_place`). ``hparams`` (lr, eps, weight_decay, beta1, beta2) and the step
    ``t`` are 0-d tensors.
    Returns the new ``(w, s1, s2)``.
    """
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]  # [5]: max_gradient, applied to grad_out before
    if optimizer == SGD:
        return w - lr * g, s1, s2
    if optimizer == LARS_SGD:  # beta1, beta2: momentum, eta
        weight_norm = w.square().sum(1).sqrt()
        scale = lr * beta2 * weight_norm / (g.square().sum(1).sqrt() + weight_decay * weight_norm)
        s1 = beta1 * s1 + scale.unsqueeze(1) * (g + weight_decay * w)
        return w - s1, s1, s2
    if optimizer in (LAMB, PARTIAL_ROWWISE_LAMB):
        s1 = beta1 * s1 + (1 - beta1) * g
        if optimizer == LAMB:
            s2 = beta2 * s2 + (1 - beta2) * g.square()
            denominator = (s2 / (1 - beta2 ** t)).sqrt() + eps
        else:
            s2 = beta2 * s2 + (1 - beta2) * g.square().mean(1)
            denominator = ((s2 / (1 - beta2 ** t)).sqrt() + eps).unsqueeze(1)
        direction = s1 / (1 - beta1 ** t) / denominator + weight_decay * w
        ratio = w.square().sum(1).sqrt() / direction.square().sum(1).sqrt()
        return w - (lr * ratio).unsqueeze(1) * direction, s1, s2
    if optimizer == PARTIAL_ROWWISE_ADAM:
        s1 = beta1 * s1 + (1 - beta1) * g
        s2 = beta2 * s2 + (1 - beta2) * g.square().mean(1)
        denominator = ((s2 / (1 - beta2 ** t)).sqrt() + eps).unsqueeze(1)
        return w - lr * (s1 / (1 - beta1 ** t) / denominator + weight_decay * w), s1, s2
    if optimizer == ROWWISE_ADAGRAD_COUNTER:
        multiplier, correction, s1, s2 = counter_factors(w, g, s1, s2, hparams, t)
        return correction.unsqueeze(1) * w - multiplier.unsqueeze(1) * g, s1, s2
    if optimizer == EXACT_ADAGRAD_DECOUPLED:
        s1 = s1 + g.square()
        return w - lr * (g / (s1.sqrt() + eps) + weight_decay * w), s1, s2
    if optimizer == ADAM_DECOUPLED:
        s1 = beta1 * s1 + (1 - beta1) * g
        s2 = beta2 * s2 + (1 - beta2) * g.square()
        update = s1 / (1 - beta1 ** t) / ((s2 / (1 - beta2 ** t)).sqrt() + eps)
        return w - lr * (update + weight_decay * w), s1, s2
    if optimizer == ROWWISE_ADAGRAD_DECOUPLED:
        s1 = s1 + g.square().mean(1)
        return (1 - lr * weight_decay) * w - (lr / (s1.sqrt() + eps)).unsqueeze(1) * g, s1, s2
    g = g + weight_decay * w
    if optimizer == ROWWISE_ADAGRAD:
        s1 = s1 + g.square().mean(1)
        return w - (lr / (s1.sqrt() + eps)).unsqueeze(1) * g, s1, s2
    if optimizer == EXACT_ADAGRAD:
        s1 = s1 + g.square()
        return w - lr * g / (s1.sqrt() + eps), s1, s2
    s1 = beta1 * s1 + (1 - beta1) * g
    s2 = beta2 * s2 + (1 - beta2) * g.square()
    return w - lr * (s1 / (1 - beta1 ** t)) / ((s2 / (1 - beta2 ** t)).sqrt() + eps), s1, s2


def scaled_gradient(rule: StepRule, g, s1, touched=None) -> float | None:
    """Eager, fp32 rows: where a step is ``w += alpha * g'``, with ``g'`` made from the summed
    gradient and the row's state alone (SGD; row-wise and exact Adagrad without weight decay),
    turn ``g`` into ``g'`` in place, update ``s1`` and return ``alpha``. The caller adds ``g'``
    into the rows where they lie (a streamed chunk: ``w.add_``; scattered rows: one sparse add),
    without gathering the rows and writing them back. Returns None, having changed nothing, for
    every other step: weight decay and moments read the rows, and options past
    ``max_gradient`` (hparams longer than ``[6]``) are :func:`step_in_place`'s.

    Args as in :func:`step_in_place` (``s1`` only: these optimizers keep no ``s2``).
    """
    optimizer, hparams, _ = rule
    if len(hparams) > 6 or optimizer not in (SGD, ROWWISE_ADAGRAD, EXACT_ADAGRAD):
        return None
    lr, eps, weight_decay = hparams[:3]
    if optimizer == SGD:
        return -lr
    if weight_decay:
        return None
    if optimizer == ROWWISE_ADAGRAD:
        # each row's mean square from one pass over it (g.square().mean(1) makes two)
        s1.add_(torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1]))
        step_size = s1.sqrt().add_(eps).reciprocal_().mul_(lr)
        if touched is not None:  # with eps 0, a never-touched row's step size is inf, and inf * 0 NaN
            step_size = torch.where(touched, step_size, 0.0)
        g.mul_(step_size.unsqueeze(1))
        return -1.0
    # exact Adagrad: -lr * g / denominator, rounded as step_in_place's addcdiv_ rounds it
    s1.addcmul_(g, g)
    denominator = s1.sqrt().add_(eps)
    if touched is not None:  # an untouched row steps by 0 / inf: none, even with eps 0 and no state
        denominator.masked_fill_(~touched.unsqueeze(1), math.inf)
    g.mul_(-lr).div_(denominator)
    return 1.0


# hparams of stochastic rounding, past [..., max_gradient, max_norm] (see
# jaggedrec.optim.fused): the table dtype's code (0 none: fp32 tables, 1 fp16, 2 bf16; the
# collection sets it per storage group) and the seed
ROUNDING_HPARAMS = slice(7, 9)
_MANTISSA = {1: (10, -14), 2: (7, -126)}  # code: mantissa bits, least normal exponent


def _mix(h):
    """A 32-bit integer hash (int64 ``h`` in [0, 2^32), murmur3's finaliser)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def stochastic_round(w, code, seed, step):
    """``w`` (``[n, D]`` fp32) rounded stochastically to fp16 (``code`` 1) or bf16 (2): each
    element goes to one of the two nearest values of that dtype, the farther with probability
    its distance over their gap, so that the rounding is unbiased. Returns fp32 values the
    dtype holds exactly (the caller's cast keeps them). The random bits are a hash of the
    element's fp32 bits, its column, ``seed`` and ``step``: the same inputs round the same
    way on every run and whatever rows a call steps (chunks, threads, scattered or streamed).

    ``code``, ``seed``, ``step``: numbers (eager) or 0-d tensors (static)."""
    bits = w.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    column = torch.arange(w.shape[1], device=w.device, dtype=torch.int64)
    key = (torch.as_tensor(seed).to(torch.int64) * 0x9E3779B1 + torch.as_tensor(step).to(torch.int64) * 0x27D4EB2F)
    random = _mix((bits ^ _mix((column * 0x165667B1 + key) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    # fp16: w / ulp (exact: a power of two) split into its integer part and the fraction to round
    exponent = torch.clamp(((bits >> 23) & 0xFF) - 127, min=-14)
    ulp = torch.ldexp(torch.ones_like(w), (exponent - 10).to(torch.int32))
    scaled = w / ulp
    kept = scaled.trunc()
    uniform = (random >> 8).to(torch.float32) * 2.0 ** -24  # [0, 1), 24 bits
    half = (kept + torch.where(uniform < (scaled - kept).abs(), scaled.sign(), 0.0)) * ulp
    # bf16 (fp32's exponent range): 16 random bits added below the kept ones, then dropped
    brain = ((bits + (random & 0xFFFF)) & 0xFFFF0000)
    brain = torch.where(brain >= 1 << 31, brain - (1 << 32), brain).to(torch.int32).view(torch.float32)
    rounded = torch.where(torch.as_tensor(code) == 1, half, torch.where(torch.as_tensor(code) == 2, brain, w))
    return torch.where(w.isfinite(), rounded, w)
