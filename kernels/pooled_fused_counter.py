"""Row-wise Adagrad with FBGEMM's COUNTER or COWCLIP regularization in the fused step
(``pooled_fused``'s optimizer 10): the per-row factors of the step and the weight decay from
the row's counters, in fp32 as FBGEMM's GPU step makes them (``jaggedrec.ops.fused_rules_counter``
makes the same in float64, rounded once, as FBGEMM's CPU step does)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import META_FIELDS, META_ROW_BASE, META_WEIGHT_OFFSET
from .pooled_fused_store import stored


@triton.jit
def counter_factors(squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr, state1_ptr, state2_ptr,
                     hparams_ptr, lr, eps, weight_decay, t):
    """Row-wise Adagrad with FBGEMM's COUNTER or COWCLIP regularization (see
    ``jaggedrec.ops.fused_rules_counter.counter_factors``, the same rules in fp32, as FBGEMM's GPU
    step): updates the row's sum of mean squares and its ``[prev_iter, row_counter]`` and
    returns ``(multiplier, correction)``, ``[BLOCK_U]`` each (``w = correction * w -
    multiplier * g``)."""
    reg = tl.load(hparams_ptr + 7)
    decay_mode = tl.load(hparams_ptr + 8)
    halflife = tl.load(hparams_ptr + 9)
    adjustment_iter = tl.load(hparams_ptr + 10)
    adjustment_ub = tl.load(hparams_ptr + 11)
    lr_mode = tl.load(hparams_ptr + 12)
    tail = tl.load(hparams_ptr + 13)
    norm_coefficient = tl.load(hparams_ptr + 14)
    lower = tl.load(hparams_ptr + 15)
    meta = meta_ptr + tl.load(run_feature_ptr + u, mask=live, other=0) * META_FIELDS
    dim = tl.maximum(dim, 1)  # dead lanes have dim 0
    state_index = (tl.load(meta + META_ROW_BASE, mask=live, other=0)
                   + (row - tl.load(meta + META_WEIGHT_OFFSET, mask=live, other=0)) // dim)
    prev = tl.load(state2_ptr + 2 * state_index, mask=live, other=0.0).to(tl.float32)
    counter = tl.load(state2_ptr + 2 * state_index + 1, mask=live, other=0.0).to(tl.float32)
    delta = tl.where(prev == 0.0, 1.0, t - prev)
    decayed = tl.exp(delta * (-0.6931471805599453 / tl.where(halflife > 0.0, halflife, 1.0))) * counter + 1.0
    counter = tl.where(halflife > 0.0, decayed, tl.where(halflife == 0.0, 1.0, counter + 1.0))
    freq = halflife / counter
    state = tl.load(state1_ptr + state_index, mask=live, other=0.0).to(tl.float32) + squares / dim.to(tl.float32)
    tl.store(state1_ptr + state_index, stored(state, state1_ptr), mask=live)
    tl.store(state2_ptr + 2 * state_index, stored(t + 0.0 * prev, state2_ptr), mask=live)
    tl.store(state2_ptr + 2 * state_index + 1, stored(counter, state2_ptr), mask=live)
    root = tl.sqrt(state)
    multiplier = lr / (root + eps)
    # (flags as 0/1 factors: the interpreter cannot AND a scalar flag with a vector one)
    adjusting = tl.where(adjustment_iter <= 0.0, 1.0, tl.where(t > adjustment_iter, 1.0, 0.0))
    counter_sgd = tl.where(counter > tail, tl.where(lr_mode == 2.0, adjusting, 0.0), 0.0)
    counter_multiplier = tl.where(counter_sgd > 0.0, lr / (tl.sqrt(adjustment_ub * counter) + eps), multiplier)
    adagradw = tl.where(halflife == -1.0, multiplier * tl.sqrt(counter), tl.where(
        halflife == -2.0, tl.minimum(lr * counter, adjustment_ub) / (root + eps), counter_multiplier))
    base = 1.0 - weight_decay * lr
    lazy = tl.exp((tl.minimum(delta, t - adjustment_iter) - 1.0) * tl.log(base))
    counter_multiplier = tl.where(adjusting * (decay_mode == 3.0).to(tl.float32) > 0.0, adagradw * lazy,
                                  counter_multiplier)
    counter_correction = tl.where(
        decay_mode == 3.0, base * lazy, tl.where(decay_mode == 2.0, 1.0 - freq * weight_decay * lr, tl.where(
            decay_mode == 1.0, 1.0 - freq * weight_decay * multiplier, 1.0)))
    counter_correction = tl.where(adjusting > 0.0, counter_correction, 1.0)
    clip = counter * tl.maximum(norm_coefficient * tl.sqrt(weight_squares), lower)
    norm = tl.sqrt(squares)
    cowclip_multiplier = tl.where(norm > 0.0, tl.minimum(clip / tl.where(norm > 0.0, norm, 1.0), 1.0),
                                  1.0) * multiplier
    cowclip_correction = tl.where(decay_mode == 2.0, base, tl.where(
        decay_mode == 1.0, 1.0 - weight_decay * cowclip_multiplier, 1.0))
    return (tl.where(reg == 4.0, cowclip_multiplier, counter_multiplier),
            tl.where(reg == 4.0, cowclip_correction, counter_correction))
