"""Fused optimizer step inside the backward: each touched row is updated once, in place.

Same runs as ``row_runs`` (contributions sorted by row): programs take tiles of
``BLOCK_U`` runs, sum each run's gradient in sorted order (``run_sums``), so the update is
deterministic, and apply the optimizer to those rows and their state. No weight gradient is
ever written to memory.

Optimizers (``OPTIMIZER``): 1 SGD; 2 row-wise Adagrad (one state value per row:
``state += mean(g^2)``, ``w -= lr * g / (sqrt(state) + eps)``); 3 lazy Adam (element-wise
moments, bias correction by the global step, touched rows only); 4 exact Adagrad
(element-wise ``state += g^2``); 5 LARS-SGD (a per-row trust ratio from the row's weight
and gradient norms, element-wise momentum); 6 partial row-wise Adam (element-wise first
moment, one second moment per row, decoupled weight decay); 7 LAMB and 8 partial row-wise
LAMB (Adam's direction, or partial row-wise Adam's, plus weight decay, scaled by the row's
trust ratio ``|w| / |direction|``: the moments are updated and the norms summed in one pass
over a row's column tiles, the rows stepped in another); 9 row-wise Adagrad with decoupled
weight decay (FBGEMM's DECOUPLE: ``w = (1 - lr * wd) * w - step``); 10 row-wise Adagrad with
FBGEMM's COUNTER or COWCLIP regularization (row counters beside the sums, ``[R, 2]`` in
``state2``, and the counter hyper-parameters past ``hparams[6]``); 11 Adam and 12 exact Adagrad
with decoupled weight decay (``w -= lr * (update + wd * w)``). For 2-4 ``weight_decay`` adds
``wd * w`` to the gradient first; 5 and 6 use it inside their formulas (``jaggedrec.optim.fused``
gives them all). Hyperparameters are read from a device tensor ``[lr, eps, weight_decay,
beta1, beta2]`` (LARS-SGD: ``momentum``, ``eta`` for the betas), so changing them needs no
recompilation. 2, 5 and 6 need sums over the whole row before any of it is updated: where a
row spans several column tiles, a first pass over the tiles makes them.
"""

from __future__ import annotations

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
import triton.language as tl

from .common import META_FIELDS, META_ROW_BASE, META_WEIGHT_OFFSET, persistent_programs, wrap_triton
from .row_runs import Runs, launch_args, run_configs, run_sums, run_tile
from .tuning import autotune

SGD, ROWWISE_ADAGRAD, ADAM, EXACT_ADAGRAD, LARS_SGD, PARTIAL_ROWWISE_ADAM = 1, 2, 3, 4, 5, 6
LAMB, PARTIAL_ROWWISE_LAMB, ROWWISE_ADAGRAD_DECOUPLED = 7, 8, 9
ROWWISE_ADAGRAD_COUNTER, ADAM_DECOUPLED, EXACT_ADAGRAD_DECOUPLED = 10, 11, 12


@triton.jit
def _stored(x, ptr):
    """fp32 ``x`` in the dtype of ``ptr`` (optimizer state in fp32, fp16 or bf16), rounded to
    nearest even: bf16 by hand, as the interpreter's cast truncates (a GPU's rounds to nearest)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x)  # NaN stays NaN
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC: tl.constexpr):
    """Stepped rows ``w`` (fp32) in the table's dtype: rounded to nearest, or with
    ``STOCHASTIC`` (fp16/bf16 tables) to one of the two nearest values, the farther with
    probability its distance over their gap, from philox bits of (seed ``hparams[8]``, step) at
    the element's offset: the same seed gives the same bits."""
    if STOCHASTIC:
        key = (tl.load(hparams_ptr + 8).to(tl.int64) << 32) + t.to(tl.int64)
        random = tl.randint(key, element)
        bits = w.to(tl.uint32, bitcast=True)
        if weights_ptr.dtype.element_ty == tl.bfloat16:  # 16 random bits below the kept ones
            rounded = ((bits + (random & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:  # fp16: w / ulp (a power of two, at least fp16's least subnormal) split and rounded
            exponent = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -14)
            ulp = ((exponent + 117) << 23).to(tl.float32, bitcast=True)
            scaled = w / ulp
            finite = tl.abs(scaled) < 4096.0
            kept = tl.where(finite, scaled, 0.0).to(tl.int32).to(tl.float32)  # toward zero
            uniform = (random >> 8).to(tl.float32) * 5.960464477539063e-08  # [0, 1), 24 bits
            away = tl.where(uniform < tl.abs(scaled - kept), tl.where(scaled < 0.0, -1.0, 1.0), 0.0)
            rounded = tl.where(finite, (kept + away) * ulp, w)
        w = tl.where(w == w, rounded, w)  # NaN stays NaN
    return w.to(weights_ptr.dtype.element_ty)


@triton.jit
def _counter_factors(squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr, state1_ptr, state2_ptr,
                     hparams_ptr, lr, eps, weight_decay, t):
    """Row-wise Adagrad with FBGEMM's COUNTER or COWCLIP regularization (see
    ``jaggedrec.ops.fused_rules.counter_factors``, the same rules in fp32, as FBGEMM's GPU
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
    tl.store(state1_ptr + state_index, _stored(state, state1_ptr), mask=live)
    tl.store(state2_ptr + 2 * state_index, _stored(t + 0.0 * prev, state2_ptr), mask=live)
    tl.store(state2_ptr + 2 * state_index + 1, _stored(counter, state2_ptr), mask=live)
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


@triton.jit
def _row_factor(squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr, state1_ptr, state2_ptr, lr,
                eps, weight_decay, beta2, t, OPTIMIZER: tl.constexpr):
    """What each row's update needs from sums over the whole row, ``[BLOCK_U]``, with the
    row-wise state updated: row-wise Adagrad's step size (its state += the mean squared
    gradient); LARS-SGD's scaled learning rate (``beta2`` is eta); partial row-wise Adam's
    denominator (its row-wise second moment moves toward the mean squared gradient), which
    partial row-wise LAMB shares."""
    if OPTIMIZER == 5:
        weight_norm = tl.sqrt(weight_squares)
        denominator = tl.sqrt(squares) + weight_decay * weight_norm
        return lr * beta2 * weight_norm / tl.where(live, denominator, 1.0)  # dead lanes: not 0 / 0
    meta = meta_ptr + tl.load(run_feature_ptr + u, mask=live, other=0) * META_FIELDS
    dim = tl.maximum(dim, 1)  # dead lanes have dim 0
    state_index = (tl.load(meta + META_ROW_BASE, mask=live, other=0)
                   + (row - tl.load(meta + META_WEIGHT_OFFSET, mask=live, other=0)) // dim)
    mean_square = squares / dim.to(tl.float32)
    if OPTIMIZER == 6 or OPTIMIZER == 8:
        v = (beta2 * tl.load(state2_ptr + state_index, mask=live, other=0.0).to(tl.float32)
             + (1.0 - beta2) * mean_square)
        tl.store(state2_ptr + state_index, _stored(v, state2_ptr), mask=live)
        return tl.sqrt(v / (1.0 - tl.exp(t * tl.log(beta2)))) + eps
    state = tl.load(state1_ptr + state_index, mask=live, other=0.0).to(tl.float32) + mean_square
    tl.store(state1_ptr + state_index, _stored(state, state1_ptr), mask=live)
    return lr / (tl.sqrt(state) + eps)


@triton.jit
def _decayed_tile(d0, start, length, longest, long_rank, live, row, dim, grad_out_ptr, item_offset_ptr,
                  item_scale_ptr, long_sums_ptr, weights_ptr, weight_decay, ROW_STRIDE: tl.constexpr,
                  HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
                  LEGACY_LOOPS: tl.constexpr):
    """Columns ``d0 .. d0+BLOCK_D-1`` of a tile of runs' rows: the gradient with weight decay
    added, the rows (fp32), the mask of live columns, and the elements' offsets."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = live[:, None] & (cols[None, :] < dim[:, None])
    element = row[:, None] + cols[None, :]
    g = run_sums(start, length, longest, long_rank, cols, mask, grad_out_ptr, item_offset_ptr, item_scale_ptr,
                 long_sums_ptr, ROW_STRIDE, HAS_SCALE, DIM_ALIGN, UNROLL, LEGACY_LOOPS)
    w = tl.load(weights_ptr + element, mask=mask, other=0.0).to(tl.float32)
    return g + weight_decay * w, w, mask, element  # weight_decay: 0 where the optimizer has no L2 term


@triton.jit
def _step_tile(g, w, element, mask, step_size, correction, weights_ptr, state1_ptr, state2_ptr, hparams_ptr, lr, eps,
               weight_decay, beta1, beta2, t, OPTIMIZER: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Update one ``[BLOCK_U, BLOCK_D]`` tile of rows (``element``: their element offsets);
    ``step_size``: :func:`_row_factor`'s, or ``lr``; ``correction``: the counter kind's
    factor of the row (:func:`_counter_factors`)."""
    if OPTIMIZER == 4:
        s = tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + g * g
        tl.store(state1_ptr + element, _stored(s, state1_ptr), mask=mask)
        w = w - lr * g / (tl.sqrt(s) + eps)
    elif OPTIMIZER == 12:  # exact Adagrad, decoupled weight decay
        s = tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + g * g
        tl.store(state1_ptr + element, _stored(s, state1_ptr), mask=mask)
        w = w - lr * (g / (tl.sqrt(s) + eps) + weight_decay * w)
    elif OPTIMIZER == 11:  # Adam, decoupled weight decay
        m = beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(state2_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
        tl.store(state1_ptr + element, _stored(m, state1_ptr), mask=mask)
        tl.store(state2_ptr + element, _stored(v, state2_ptr), mask=mask)
        m_hat = m / (1.0 - tl.exp(t * tl.log(beta1)))
        v_hat = v / (1.0 - tl.exp(t * tl.log(beta2)))
        w = w - lr * (m_hat / (tl.sqrt(v_hat) + eps) + weight_decay * w)
    elif OPTIMIZER == 10:
        w = correction[:, None] * w - step_size[:, None] * g
    elif OPTIMIZER == 5:
        m = (beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32)
             + step_size[:, None] * (g + weight_decay * w))
        tl.store(state1_ptr + element, _stored(m, state1_ptr), mask=mask)
        w = w - m
    elif OPTIMIZER == 6:
        m = beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        tl.store(state1_ptr + element, _stored(m, state1_ptr), mask=mask)
        w = w - lr * (m / (1.0 - tl.exp(t * tl.log(beta1))) / step_size[:, None] + weight_decay * w)
    elif OPTIMIZER == 3:
        m = beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(state2_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
        tl.store(state1_ptr + element, _stored(m, state1_ptr), mask=mask)
        tl.store(state2_ptr + element, _stored(v, state2_ptr), mask=mask)
        m_hat = m / (1.0 - tl.exp(t * tl.log(beta1)))
        v_hat = v / (1.0 - tl.exp(t * tl.log(beta2)))
        w = w - lr * m_hat / (tl.sqrt(v_hat) + eps)
    elif OPTIMIZER == 9:  # row-wise Adagrad, decoupled weight decay
        w = (1.0 - lr * weight_decay) * w - step_size[:, None] * g
    else:
        w = w - step_size[:, None] * g
    tl.store(weights_ptr + element, _table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC), mask=mask)


@triton.jit
def _lamb_direction(g, w, element, mask, row_denominator, state1_ptr, state2_ptr, eps, weight_decay, beta1, beta2, t,
                    OPTIMIZER: tl.constexpr, UPDATE: tl.constexpr):
    """LAMB's direction for one tile, ``m_hat / (sqrt(v_hat) + eps) + weight_decay * w``; with
    ``UPDATE`` the moments first move toward ``g`` (and are stored), without it they are read
    as the first pass left them. Partial row-wise LAMB's denominator is ``row_denominator``."""
    m = tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32)
    if UPDATE:
        m = beta1 * m + (1.0 - beta1) * g
        tl.store(state1_ptr + element, _stored(m, state1_ptr), mask=mask)
    if OPTIMIZER == 7:
        v = tl.load(state2_ptr + element, mask=mask, other=0.0).to(tl.float32)
        if UPDATE:
            v = beta2 * v + (1.0 - beta2) * g * g
            tl.store(state2_ptr + element, _stored(v, state2_ptr), mask=mask)
        denominator = tl.sqrt(v / (1.0 - tl.exp(t * tl.log(beta2)))) + eps
    else:
        denominator = row_denominator[:, None]
    return m / (1.0 - tl.exp(t * tl.log(beta1))) / denominator + weight_decay * w


@triton.jit
def _lamb_ratio(weight_squares, direction_squares, live, lr):
    """``lr * |w| / |direction|`` per row; dead lanes 0 (not 0 / 0)."""
    return tl.where(live, lr * tl.sqrt(weight_squares) / tl.sqrt(tl.where(live, direction_squares, 1.0)), 0.0)


@autotune(configs=run_configs(), key=["BLOCK_D", "HAS_SCALE", "DIM_ALIGN", "OPTIMIZER"])
@triton.jit
def _fused_update_kernel(
    grad_out_ptr, num_runs_ptr, run_start_ptr, run_row_ptr, run_feature_ptr, item_offset_ptr, item_scale_ptr,
    long_rank_ptr, long_sums_ptr, meta_ptr, weights_ptr, state1_ptr, state2_ptr, hparams_ptr, step_ptr,
    OPTIMIZER: tl.constexpr, HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr, ROW_STRIDE: tl.constexpr,
    BLOCK_D: tl.constexpr, LEGACY_LOOPS: tl.constexpr,
    ONE_TILE: tl.constexpr, BLOCK_U: tl.constexpr, UNROLL: tl.constexpr, STOCHASTIC: tl.constexpr = False,
):
    lr = tl.load(hparams_ptr + 0)
    eps = tl.load(hparams_ptr + 1)
    weight_decay = tl.load(hparams_ptr + 2)
    beta1 = tl.load(hparams_ptr + 3)
    beta2 = tl.load(hparams_ptr + 4)
    t = tl.load(step_ptr).to(tl.float32)
    # the L2 term added to the gradient (row-wise Adagrad, Adam, exact Adagrad); the others' own
    l2 = weight_decay if OPTIMIZER == 2 or OPTIMIZER == 3 or OPTIMIZER == 4 else 0.0 * weight_decay
    ROW_SUMS: tl.constexpr = (OPTIMIZER == 2 or OPTIMIZER == 5 or OPTIMIZER == 6 or OPTIMIZER == 8 or OPTIMIZER == 9
                              or OPTIMIZER == 10)
    # the counter kind's L2 term (its counter weight-decay mode 1) enters the squares only
    if OPTIMIZER == 10:
        squares_l2 = tl.where(tl.load(hparams_ptr + 8) == 1.0, weight_decay, 0.0)
    else:
        squares_l2 = 0.0 * weight_decay
    IS_LAMB: tl.constexpr = OPTIMIZER == 7 or OPTIMIZER == 8
    # programs take turns over tiles of BLOCK_U runs: u0 = pid, pid + G, ... (times BLOCK_U)
    num_runs = tl.load(num_runs_ptr)
    for u0 in range(tl.program_id(0) * BLOCK_U, num_runs, tl.num_programs(0) * BLOCK_U):
        u, live, start, length, longest, dim, long_rank = run_tile(
            u0, num_runs, run_start_ptr, run_feature_ptr, long_rank_ptr, meta_ptr, DIM_ALIGN, BLOCK_U)
        row = tl.multiple_of(tl.load(run_row_ptr + u, mask=live, other=0), DIM_ALIGN)
        step_size = tl.full([BLOCK_U], 1.0, tl.float32) * lr
        correction = step_size
        if ONE_TILE:  # every dim fits one tile: gather each run's gradient once
            g, w, mask, element = _decayed_tile(
                0, start, length, longest, long_rank, live, row, dim, grad_out_ptr, item_offset_ptr, item_scale_ptr,
                long_sums_ptr, weights_ptr, l2, ROW_STRIDE, HAS_SCALE, DIM_ALIGN, BLOCK_D, UNROLL,
                LEGACY_LOOPS)
            if OPTIMIZER == 10:
                squared = g + squares_l2 * w
                step_size, correction = _counter_factors(
                    tl.sum(squared * squared, axis=1), tl.sum(w * w, axis=1), u, live, row, dim, run_feature_ptr,
                    meta_ptr, state1_ptr, state2_ptr, hparams_ptr, lr, eps, weight_decay, t)
            elif ROW_SUMS:
                step_size = _row_factor(tl.sum(g * g, axis=1), tl.sum(w * w, axis=1), u, live, row, dim,
                                        run_feature_ptr, meta_ptr, state1_ptr, state2_ptr, lr, eps, weight_decay,
                                        beta2, t, OPTIMIZER)
            if IS_LAMB:
                direction = _lamb_direction(g, w, element, mask, step_size, state1_ptr, state2_ptr, eps, weight_decay,
                                            beta1, beta2, t, OPTIMIZER, True)
                ratio = _lamb_ratio(tl.sum(w * w, axis=1), tl.sum(direction * direction, axis=1), live, lr)
                w = w - ratio[:, None] * direction
                tl.store(weights_ptr + element, _table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC),
                         mask=mask)
            else:
                _step_tile(g, w, element, mask, step_size, correction, weights_ptr, state1_ptr, state2_ptr,
                           hparams_ptr, lr, eps, weight_decay, beta1, beta2, t, OPTIMIZER, STOCHASTIC)
        else:
            if ROW_SUMS:
                # the row factor needs sums over all of a row's columns before any update
                squares = tl.zeros([BLOCK_U], dtype=tl.float32)
                weight_squares = tl.zeros([BLOCK_U], dtype=tl.float32)
                for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                    g, w, mask, element = _decayed_tile(
                        d0, start, length, longest, long_rank, live, row, dim, grad_out_ptr, item_offset_ptr,
                        item_scale_ptr, long_sums_ptr, weights_ptr, l2, ROW_STRIDE, HAS_SCALE, DIM_ALIGN,
                        BLOCK_D, UNROLL, LEGACY_LOOPS)
                    if OPTIMIZER == 10:
                        g = g + squares_l2 * w
                    squares += tl.sum(g * g, axis=1)
                    if OPTIMIZER == 5 or OPTIMIZER == 10:
                        weight_squares += tl.sum(w * w, axis=1)
                if OPTIMIZER == 10:
                    step_size, correction = _counter_factors(
                        squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr, state1_ptr,
                        state2_ptr, hparams_ptr, lr, eps, weight_decay, t)
                else:
                    step_size = _row_factor(squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr,
                                            state1_ptr, state2_ptr, lr, eps, weight_decay, beta2, t, OPTIMIZER)
            if IS_LAMB:
                # the moments move and the norms are summed over every tile of the row ...
                weight_squares = tl.zeros([BLOCK_U], dtype=tl.float32)
                direction_squares = tl.zeros([BLOCK_U], dtype=tl.float32)
                for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                    g, w, mask, element = _decayed_tile(
                        d0, start, length, longest, long_rank, live, row, dim, grad_out_ptr, item_offset_ptr,
                        item_scale_ptr, long_sums_ptr, weights_ptr, l2, ROW_STRIDE, HAS_SCALE, DIM_ALIGN,
                        BLOCK_D, UNROLL, LEGACY_LOOPS)
                    direction = _lamb_direction(g, w, element, mask, step_size, state1_ptr, state2_ptr, eps,
                                                weight_decay, beta1, beta2, t, OPTIMIZER, True)
                    weight_squares += tl.sum(w * w, axis=1)
                    direction_squares += tl.sum(direction * direction, axis=1)
                ratio = _lamb_ratio(weight_squares, direction_squares, live, lr)
                # ... before any of it is stepped, with the direction made again from the new moments
                for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    mask = live[:, None] & (cols[None, :] < dim[:, None])
                    element = row[:, None] + cols[None, :]
                    w = tl.load(weights_ptr + element, mask=mask, other=0.0).to(tl.float32)
                    direction = _lamb_direction(w, w, element, mask, step_size, state1_ptr, state2_ptr, eps,
                                                weight_decay, beta1, beta2, t, OPTIMIZER, False)
                    w = w - ratio[:, None] * direction
                    tl.store(weights_ptr + element, _table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC),
                         mask=mask)
            else:
                for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                    g, w, mask, element = _decayed_tile(
                        d0, start, length, longest, long_rank, live, row, dim, grad_out_ptr, item_offset_ptr,
                        item_scale_ptr, long_sums_ptr, weights_ptr, l2, ROW_STRIDE, HAS_SCALE, DIM_ALIGN,
                        BLOCK_D, UNROLL, LEGACY_LOOPS)
                    _step_tile(g, w, element, mask, step_size, correction, weights_ptr, state1_ptr, state2_ptr,
                               hparams_ptr, lr, eps, weight_decay, beta1, beta2, t, OPTIMIZER, STOCHASTIC)


def fused_update(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, weights: torch.Tensor, fused,
                 max_dim: int, alignment: int) -> None:
    """Apply ``fused.optimizer`` to every touched row of ``weights``, in place.

    Args as in ``row_runs.rows_grad``, plus:
        weights: ``[W]`` flat weights of every table (updated).
        fused: the op layer's ``FusedStep``: ``optimizer`` 1 SGD ... 6 partial row-wise Adam
            (see the module docstring); ``hparams`` ``[5]`` fp32 ``lr, eps, weight_decay, beta1,
            beta2``; ``step`` ``[1]`` int64 step count, already counting this step (Adam's bias
            correction); ``state1`` row-wise Adagrad ``[R]`` fp32 sums of mean squares (R = rows
            of all tables), or ``[W]`` fp32 (Adam's and partial row-wise Adam's first moments,
            exact Adagrad's sums of squares, LARS-SGD's momentum), unused for SGD; ``state2``
            Adam ``[W]`` fp32 second moments, partial row-wise Adam ``[R]``, unused otherwise.
    """
    if fused.hparams.shape[0] == 7:  # [6]: max_norm (see jaggedrec.optim.fused)
        raise ValueError(f"max_norm: the Triton fused step of optimizer kind {fused.optimizer} does not renormalise "
                         f"rows yet; use backend='torch' or max_norm=0")
    if statically_known_true(runs.item_offset.shape[0] == 0):
        return
    args, constants = launch_args(grad_out, runs, meta, max_dim, alignment)
    wrap_triton(_fused_update_kernel)[(persistent_programs(grad_out.device),)](
        *args, weights, fused.state1, fused.state2, fused.hparams, fused.step, OPTIMIZER=fused.optimizer,
        ONE_TILE=max_dim <= constants["BLOCK_D"],
        # [9]: stochastic rounding (see jaggedrec.optim.fused), for fp16/bf16 tables
        STOCHASTIC=fused.hparams.shape[0] == 9 and weights.dtype in (torch.float16, torch.bfloat16), **constants)
