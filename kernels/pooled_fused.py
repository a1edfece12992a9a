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
row spans several column tiles, a first pass over the tiles makes them. With ``MAX_NORM``
(``hparams[6]``), each stepped row whose norm exceeds it is scaled down to it before it is
stored (over several column tiles: after, in one more pass); how values are stored (state and
table dtypes, stochastic rounding) is ``pooled_fused_store``'s.
"""

from __future__ import annotations

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
import triton.language as tl

from .common import META_FIELDS, META_ROW_BASE, META_WEIGHT_OFFSET, persistent_programs, wrap_triton
from .pooled_fused_counter import counter_factors
from .pooled_fused_store import norm_scale, stored, table_values
from .row_runs import Runs, launch_args, run_configs, run_sums, run_tile
from .tuning import autotune

SGD, ROWWISE_ADAGRAD, ADAM, EXACT_ADAGRAD, LARS_SGD, PARTIAL_ROWWISE_ADAM = 1, 2, 3, 4, 5, 6
LAMB, PARTIAL_ROWWISE_LAMB, ROWWISE_ADAGRAD_DECOUPLED = 7, 8, 9
ROWWISE_ADAGRAD_COUNTER, ADAM_DECOUPLED, EXACT_ADAGRAD_DECOUPLED = 10, 11, 12


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
        tl.store(state2_ptr + state_index, stored(v, state2_ptr), mask=live)
        return tl.sqrt(v / (1.0 - tl.exp(t * tl.log(beta2)))) + eps
    state = tl.load(state1_ptr + state_index, mask=live, other=0.0).to(tl.float32) + mean_square
    tl.store(state1_ptr + state_index, stored(state, state1_ptr), mask=live)
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
def _step_tile(g, w, element, mask, step_size, correction, state1_ptr, state2_ptr, lr, eps, weight_decay, beta1, beta2,
               t, OPTIMIZER: tl.constexpr):
    """One ``[BLOCK_U, BLOCK_D]`` tile of rows stepped (``element``: their element offsets), the
    state stored, the new rows (fp32) returned;
    ``step_size``: :func:`_row_factor`'s, or ``lr``; ``correction``: the counter kind's
    factor of the row (:func:`_counter_factors`)."""
    if OPTIMIZER == 4:
        s = tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + g * g
        tl.store(state1_ptr + element, stored(s, state1_ptr), mask=mask)
        w = w - lr * g / (tl.sqrt(s) + eps)
    elif OPTIMIZER == 12:  # exact Adagrad, decoupled weight decay
        s = tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + g * g
        tl.store(state1_ptr + element, stored(s, state1_ptr), mask=mask)
        w = w - lr * (g / (tl.sqrt(s) + eps) + weight_decay * w)
    elif OPTIMIZER == 11:  # Adam, decoupled weight decay
        m = beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(state2_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
        tl.store(state1_ptr + element, stored(m, state1_ptr), mask=mask)
        tl.store(state2_ptr + element, stored(v, state2_ptr), mask=mask)
        m_hat = m / (1.0 - tl.exp(t * tl.log(beta1)))
        v_hat = v / (1.0 - tl.exp(t * tl.log(beta2)))
        w = w - lr * (m_hat / (tl.sqrt(v_hat) + eps) + weight_decay * w)
    elif OPTIMIZER == 10:
        w = correction[:, None] * w - step_size[:, None] * g
    elif OPTIMIZER == 5:
        m = (beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32)
             + step_size[:, None] * (g + weight_decay * w))
        tl.store(state1_ptr + element, stored(m, state1_ptr), mask=mask)
        w = w - m
    elif OPTIMIZER == 6:
        m = beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        tl.store(state1_ptr + element, stored(m, state1_ptr), mask=mask)
        w = w - lr * (m / (1.0 - tl.exp(t * tl.log(beta1))) / step_size[:, None] + weight_decay * w)
    elif OPTIMIZER == 3:
        m = beta1 * tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(state2_ptr + element, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
        tl.store(state1_ptr + element, stored(m, state1_ptr), mask=mask)
        tl.store(state2_ptr + element, stored(v, state2_ptr), mask=mask)
        m_hat = m / (1.0 - tl.exp(t * tl.log(beta1)))
        v_hat = v / (1.0 - tl.exp(t * tl.log(beta2)))
        w = w - lr * m_hat / (tl.sqrt(v_hat) + eps)
    elif OPTIMIZER == 9:  # row-wise Adagrad, decoupled weight decay
        w = (1.0 - lr * weight_decay) * w - step_size[:, None] * g
    else:
        w = w - step_size[:, None] * g
    return w


@triton.jit
def _lamb_direction(g, w, element, mask, row_denominator, state1_ptr, state2_ptr, eps, weight_decay, beta1, beta2, t,
                    OPTIMIZER: tl.constexpr, UPDATE: tl.constexpr):
    """LAMB's direction for one tile, ``m_hat / (sqrt(v_hat) + eps) + weight_decay * w``; with
    ``UPDATE`` the moments first move toward ``g`` (and are stored), without it they are read
    as the first pass left them. Partial row-wise LAMB's denominator is ``row_denominator``."""
    m = tl.load(state1_ptr + element, mask=mask, other=0.0).to(tl.float32)
    if UPDATE:
        m = beta1 * m + (1.0 - beta1) * g
        tl.store(state1_ptr + element, stored(m, state1_ptr), mask=mask)
    if OPTIMIZER == 7:
        v = tl.load(state2_ptr + element, mask=mask, other=0.0).to(tl.float32)
        if UPDATE:
            v = beta2 * v + (1.0 - beta2) * g * g
            tl.store(state2_ptr + element, stored(v, state2_ptr), mask=mask)
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
    MAX_NORM: tl.constexpr = False,
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
                step_size, correction = counter_factors(
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
            else:
                w = _step_tile(g, w, element, mask, step_size, correction, state1_ptr, state2_ptr, lr, eps,
                               weight_decay, beta1, beta2, t, OPTIMIZER)
            if MAX_NORM:
                w = w * norm_scale(tl.sum(tl.where(mask, w * w, 0.0), axis=1), hparams_ptr)[:, None]
            tl.store(weights_ptr + element, table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC), mask=mask)
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
                    step_size, correction = counter_factors(
                        squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr, state1_ptr,
                        state2_ptr, hparams_ptr, lr, eps, weight_decay, t)
                else:
                    step_size = _row_factor(squares, weight_squares, u, live, row, dim, run_feature_ptr, meta_ptr,
                                            state1_ptr, state2_ptr, lr, eps, weight_decay, beta2, t, OPTIMIZER)
            new_squares = tl.zeros([BLOCK_U], dtype=tl.float32)  # the stepped rows' (MAX_NORM)
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
                    if MAX_NORM:
                        new_squares += tl.sum(tl.where(mask, w * w, 0.0), axis=1)
                    tl.store(weights_ptr + element, table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC),
                             mask=mask)
            else:
                for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                    g, w, mask, element = _decayed_tile(
                        d0, start, length, longest, long_rank, live, row, dim, grad_out_ptr, item_offset_ptr,
                        item_scale_ptr, long_sums_ptr, weights_ptr, l2, ROW_STRIDE, HAS_SCALE, DIM_ALIGN,
                        BLOCK_D, UNROLL, LEGACY_LOOPS)
                    w = _step_tile(g, w, element, mask, step_size, correction, state1_ptr, state2_ptr, lr, eps,
                                   weight_decay, beta1, beta2, t, OPTIMIZER)
                    if MAX_NORM:
                        new_squares += tl.sum(tl.where(mask, w * w, 0.0), axis=1)
                    tl.store(weights_ptr + element, table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC),
                             mask=mask)
            if MAX_NORM:
                # the rows past max_norm scaled down as stored (16-bit tables: rounded twice)
                scale = norm_scale(new_squares, hparams_ptr)
                tl.debug_barrier()  # the stores above, by whichever threads, before the loads
                for d0 in range(0, tl.max(dim, axis=0), BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    mask = (live & (scale < 1.0))[:, None] & (cols[None, :] < dim[:, None])
                    element = row[:, None] + cols[None, :]
                    w = tl.load(weights_ptr + element, mask=mask, other=0.0).to(tl.float32) * scale[:, None]
                    tl.store(weights_ptr + element, table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC),
                             mask=mask)


def fused_update(grad_out: torch.Tensor, runs: Runs, meta: torch.Tensor, weights: torch.Tensor, fused,
                 max_dim: int, alignment: int) -> None:
    """Apply ``fused.optimizer`` to every touched row of ``weights``, in place.

    Args as in ``row_runs.rows_grad``, plus:
        weights: ``[W]`` flat weights of every table (updated).
        fused: the op layer's ``FusedStep``: ``optimizer`` 1 SGD ... 6 partial row-wise Adam
            (see the module docstring); ``hparams`` ``[5]`` fp32 ``lr, eps, weight_decay, beta1,
            beta2``, then the options' (``jaggedrec.ops.fused_rules_kinds``: ``[7]`` ends with
            ``max_norm``, ``[9]`` with stochastic rounding's); ``step`` ``[1]`` int64 step count, already counting this step (Adam's bias
            correction); ``state1`` row-wise Adagrad ``[R]`` fp32 sums of mean squares (R = rows
            of all tables), or ``[W]`` fp32 (Adam's and partial row-wise Adam's first moments,
            exact Adagrad's sums of squares, LARS-SGD's momentum), unused for SGD; ``state2``
            Adam ``[W]`` fp32 second moments, partial row-wise Adam ``[R]``, unused otherwise.
    """
    if statically_known_true(runs.item_offset.shape[0] == 0):
        return
    args, constants = launch_args(grad_out, runs, meta, max_dim, alignment)
    wrap_triton(_fused_update_kernel)[(persistent_programs(grad_out.device),)](
        *args, weights, fused.state1, fused.state2, fused.hparams, fused.step, OPTIMIZER=fused.optimizer,
        ONE_TILE=max_dim <= constants["BLOCK_D"],
        # [9]: stochastic rounding (see jaggedrec.optim.fused), for fp16/bf16 tables
        STOCHASTIC=fused.hparams.shape[0] == 9 and weights.dtype in (torch.float16, torch.bfloat16),
        # [7]: [6] is max_norm (set: > 0; stochastic rounding and the counter kind refuse it)
        MAX_NORM=fused.hparams.shape[0] == 7, **constants)
