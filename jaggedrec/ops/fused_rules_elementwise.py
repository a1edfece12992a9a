"""The step rules of the optimizers whose state is per element or none: SGD, exact Adagrad and
lazy Adam, with weight decay as L2 or decoupled (see ``jaggedrec.optim.fused`` for the
formulas). A row's step reads nothing but its own elements, so column blocks of a table step
alone (no whole-row sums, unlike ``fused_rules_rowwise``).

:func:`step_in_place` is the eager form (few passes, in place; untouched rows bit for bit as
they were), :func:`stepped` the functional one of the static path; :func:`scaled_gradient`
the step as a scaled gradient, where the rows need not be gathered.
"""

from __future__ import annotations

import math

import torch

from jaggedrec.ops.fused_rules_kinds import (ADAM, ADAM_DECOUPLED, EXACT_ADAGRAD, EXACT_ADAGRAD_DECOUPLED, MAX_NORM,
                                             ROWWISE_ADAGRAD, SGD, StepRule, lerp_rate)
from jaggedrec.ops.fused_rules_options import add_l2_decay, step_decoupled

KINDS = (SGD, ADAM, EXACT_ADAGRAD, ADAM_DECOUPLED, EXACT_ADAGRAD_DECOUPLED)


def step_in_place(optimizer: int, hparams, step: int, w, g, s1, s2, touched=None) -> None:
    """One step of rows ``w`` (``[n, D]`` fp32) with summed gradients ``g`` (``[n, D]`` fp32,
    overwritten) and state ``s1``, ``s2`` (``[n, D]`` fp32 or None, updated); ``touched``:
    ``[n]`` bool, None when all rows were touched."""
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]
    if optimizer == SGD:
        w.add_(g, alpha=-lr)
        return
    decoupled = optimizer in (ADAM_DECOUPLED, EXACT_ADAGRAD_DECOUPLED)
    if not decoupled:
        add_l2_decay(g, w, weight_decay, touched)
    if optimizer in (EXACT_ADAGRAD, EXACT_ADAGRAD_DECOUPLED):
        s1.addcmul_(g, g)
        denominator = s1.sqrt().add_(eps)
        if decoupled:
            step_decoupled(w, g.div_(denominator), lr, weight_decay, touched)
            return
        if touched is not None:  # an untouched row steps by 0 / inf: none, even with eps 0 and no state
            denominator.masked_fill_(~touched.unsqueeze(1), math.inf)
        w.addcdiv_(g, denominator, value=-lr)
        return
    # Adam: moments move toward g by lerp, whose weight is 0 for untouched rows (lazy Adam
    # leaves their moments alone), and their step divides by an infinite denominator
    keep = None if touched is None else touched.unsqueeze(1).to(w.dtype)
    s1.lerp_(g, lerp_rate(beta1, keep))
    s2.lerp_(g.square() if decoupled else g.square_(), lerp_rate(beta2, keep))
    if decoupled:
        update = torch.div(s1, 1 - beta1 ** step).div_(s2.div(1 - beta2 ** step).sqrt_().add_(eps))
        step_decoupled(w, update, lr, weight_decay, touched)
        return
    denominator = s2.div(1 - beta2 ** step).sqrt_().add_(eps)
    if touched is not None:
        denominator.masked_fill_(~touched.unsqueeze(1), math.inf)
    w.addcdiv_(s1, denominator, value=-lr / (1 - beta1 ** step))


def stepped(optimizer: int, w, g, s1, s2, hparams, t):
    """:func:`step_in_place` as functional ops that Inductor fuses (every row touched);
    ``hparams`` and ``t`` 0-d tensors. Returns the new ``(w, s1, s2)``."""
    lr, eps, weight_decay, beta1, beta2 = hparams[:5]
    if optimizer == SGD:
        return w - lr * g, s1, s2
    if optimizer == EXACT_ADAGRAD_DECOUPLED:
        s1 = s1 + g.square()
        return w - lr * (g / (s1.sqrt() + eps) + weight_decay * w), s1, s2
    if optimizer == ADAM_DECOUPLED:
        s1 = beta1 * s1 + (1 - beta1) * g
        s2 = beta2 * s2 + (1 - beta2) * g.square()
        update = s1 / (1 - beta1 ** t) / ((s2 / (1 - beta2 ** t)).sqrt() + eps)
        return w - lr * (update + weight_decay * w), s1, s2
    g = g + weight_decay * w
    if optimizer == EXACT_ADAGRAD:
        s1 = s1 + g.square()
        return w - lr * g / (s1.sqrt() + eps), s1, s2
    s1 = beta1 * s1 + (1 - beta1) * g
    s2 = beta2 * s2 + (1 - beta2) * g.square()
    return w - lr * (s1 / (1 - beta1 ** t)) / ((s2 / (1 - beta2 ** t)).sqrt() + eps), s1, s2


def scaled_gradient(rule: StepRule, g, s1, touched=None, store=None) -> float | None:
    """Eager, fp32 rows: where a step is ``w += alpha * g'``, with ``g'`` made from the summed
    gradient and the row's state alone (SGD; row-wise and exact Adagrad without weight decay),
    turn ``g`` into ``g'`` in place, update ``s1`` and return ``alpha``. The caller adds ``g'``
    into the rows where they lie (a streamed chunk: ``w.add_``; scattered rows: one sparse add),
    without gathering the rows and writing them back. Returns None, having changed nothing, for
    every other step: weight decay and moments read the rows, and options past
    ``max_gradient`` (hparams longer than ``[6]``) are ``fused_rules.step_in_place``'s.

    Args as in ``fused_rules.step_in_place`` (``s1`` only: these optimizers keep no ``s2``),
    and ``store``: None where ``s1`` is the state itself (a streamed chunk), or, where ``s1`` is
    a gathered copy, a callable that writes it back: it is called with the updated ``s1``,
    which then serves as scratch (exact Adagrad's denominator, no ``[n, D]`` temporary).
    """
    optimizer, hparams, _ = rule
    if len(hparams) > MAX_NORM or optimizer not in (SGD, ROWWISE_ADAGRAD, EXACT_ADAGRAD):
        return None
    lr, eps, weight_decay = hparams[:3]
    if optimizer == SGD:
        return -lr
    if weight_decay:
        return None
    if optimizer == ROWWISE_ADAGRAD:
        # each row's mean square from one pass over it (g.square().mean(1) makes two)
        s1.add_(torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1]))
        if store is not None:
            store(s1)
        step_size = s1.sqrt().add_(eps).reciprocal_().mul_(lr)
        if touched is not None:  # with eps 0, a never-touched row's step size is inf, and inf * 0 NaN
            step_size = torch.where(touched, step_size, 0.0)
        g.mul_(step_size.unsqueeze(1))
        return -1.0
    # exact Adagrad: -lr * g / denominator, rounded as step_in_place's addcdiv_ rounds it
    s1.addcmul_(g, g)
    if store is not None:
        store(s1)
    # a stored copy becomes the denominator in place: no new [n, D] tensor to allocate and to
    # keep in cache (dlrm preset at 20 ids per bag, one table's update, loaded 2-core Xeon:
    # sqrt and eps 4.1 -> 2.5 ms)
    denominator = (s1.sqrt() if store is None else s1.sqrt_()).add_(eps)
    if touched is not None:  # an untouched row steps by 0 / inf: none, even with eps 0 and no state
        denominator.masked_fill_(~touched.unsqueeze(1), math.inf)
    g.mul_(-lr).div_(denominator)
    return 1.0
