"""The options of a fused step that act on a stepped row, whatever the optimizer: ``max_norm``
(FBGEMM's: rows past it scaled down to it) and stochastic rounding of fp16/bf16 tables (see
``jaggedrec.optim.fused``). Gradient clipping acts on the output gradient before the step
(``ops/weight_grads.clipped_grad``); state in fp16/bf16 is handled by ``fused_rules``.
"""

from __future__ import annotations

import torch

from jaggedrec.ops.fused_rules_kinds import MAX_NORM


def renormalise_in_place(w, max_norm: float, touched=None) -> None:
    """Eager: rows of ``w`` (``[n, D]`` fp32) whose L2 norm exceeds ``max_norm`` (> 0) scaled
    down to it; ``touched`` (``[n]`` bool, or None: all) limits it to the rows a step touched.

    As FBGEMM's GPU step: the norm of the row after the update, the scale ``max_norm / norm``."""
    norm = w.square().sum(1).sqrt_()
    scale = torch.where(norm > max_norm, max_norm / norm, 1.0)
    if touched is not None:
        scale = torch.where(touched, scale, 1.0)
    w.mul_(scale.unsqueeze(1))


def renormalised(w, hparams):
    """Static: :func:`renormalise_in_place` as a functional op, ``hparams[MAX_NORM]`` a 0-d
    tensor (0: off), every row touched."""
    if len(hparams) <= MAX_NORM:
        return w
    max_norm = hparams[MAX_NORM]
    norm = w.square().sum(1).sqrt()
    return w * torch.where((max_norm > 0) & (norm > max_norm), max_norm / norm, 1.0).unsqueeze(1)


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


def add_l2_decay(g, w, weight_decay: float, touched=None) -> None:
    """Eager, weight decay as L2: ``g += weight_decay * w`` (``[n, D]``), on touched rows only.

    One rounding of ``wd * w`` on every path: ``add_(w, alpha=wd)`` may fuse the multiply into
    the add (one rounding less) where ``addcmul_`` does not, and streamed and scattered rows
    then differ in the last bit."""
    if weight_decay:
        decay = w * weight_decay
        if touched is not None:
            decay.mul_(touched.unsqueeze(1))
        g.add_(decay)


def step_decoupled(w, update, lr: float, weight_decay: float, touched=None) -> None:
    """Eager, decoupled weight decay (AdamW-style, FBGEMM's DECOUPLE for element-wise and
    partial row-wise state): ``w -= lr * (update + weight_decay * w)`` (``update`` ``[n, D]``,
    consumed), touched rows only (an untouched row's update may be 0 / 0 with eps 0)."""
    if weight_decay:
        update.add_(w * weight_decay)
    if touched is not None:
        update = torch.where(touched.unsqueeze(1), update, 0.0)
    w.sub_(update.mul_(lr))
