"""Fused optimizer step inside the backward: each touched row is updated once, in place.

Same contribution layout and sorting as ``pooled_bwd``: programs take turns over the runs
of equal rows, sum each run's gradient in a fixed order (``sum_run``), so the update is
deterministic, and apply the optimizer to that row and its state. No weight gradient is
ever written to memory.

Optimizers (``OPTIMIZER``): 1 SGD; 2 row-wise Adagrad (one state value per row:
``state += mean(g^2)``, ``w -= lr * g / (sqrt(state) + eps)``); 3 lazy Adam (element-wise
moments, bias correction by the global step, touched rows only). ``weight_decay`` adds
``wd * w`` to the gradient first. Hyperparameters are read from a device tensor
``[lr, eps, weight_decay, beta1, beta2]``, so changing them needs no recompilation.
"""

from __future__ import annotations

import torch
import triton
from torch.fx.experimental.symbolic_shapes import statically_known_true
import triton.language as tl

from .common import META_FIELDS, block_d, persistent_programs, single_config, wrap_triton
from .pooled_bwd import Runs, sum_run

SGD, ROWWISE_ADAGRAD, ADAM = 1, 2, 3


def _configs():
    if single_config():
        return [triton.Config({"BLOCK_Q": 8}, num_warps=1)]
    return [triton.Config({"BLOCK_Q": q}, num_warps=w) for q, w in [(16, 2), (32, 4), (64, 4)]]


@triton.autotune(configs=_configs(), key=["BLOCK_D", "HAS_PSW", "OPTIMIZER"])
@triton.jit
def _fused_update_kernel(
    grad_out_ptr, grad_stride, sorted_rows_ptr, order_ptr, run_start_ptr, run_end_ptr, num_runs_ptr,
    contrib_feature_ptr, bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr, weights_ptr, state1_ptr, state2_ptr,
    hparams_ptr, step_ptr, num_values, batch_size,
    OPTIMIZER: tl.constexpr, HAS_PSW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # persistent grid: programs take turns over the runs of equal rows, u = pid, pid + G, ...
    num_runs = tl.load(num_runs_ptr)
    for u in range(tl.program_id(0), num_runs, tl.num_programs(0)):
        p = tl.load(run_start_ptr + u)
        row = tl.load(sorted_rows_ptr + p)
        end = tl.load(run_end_ptr + p)
        meta = meta_ptr + tl.load(contrib_feature_ptr + tl.load(order_ptr + p)).to(tl.int64) * META_FIELDS
        weight_offset = tl.load(meta + 0)
        dim = tl.load(meta + 1)
        lr = tl.load(hparams_ptr + 0)
        eps = tl.load(hparams_ptr + 1)
        weight_decay = tl.load(hparams_ptr + 2)
        step_size = lr
        if OPTIMIZER == 2:
            # the row's step size needs mean(g^2) over all of its columns before any update
            squares = tl.zeros([], dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_mask = cols < dim
                g = sum_run(p, end, cols, col_mask, grad_out_ptr, grad_stride, order_ptr, contrib_feature_ptr,
                            bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr, num_values, batch_size,
                            HAS_PSW, BLOCK_Q)
                w = tl.load(weights_ptr + row + cols, mask=col_mask, other=0.0).to(tl.float32)
                g = g + weight_decay * w
                squares += tl.sum(tl.where(col_mask, g * g, 0.0), axis=0)
            state_index = tl.load(meta + 6) + (row - weight_offset) // dim
            state = tl.load(state1_ptr + state_index) + squares / dim.to(tl.float32)
            tl.store(state1_ptr + state_index, state)
            step_size = lr / (tl.sqrt(state) + eps)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < dim
            g = sum_run(p, end, cols, col_mask, grad_out_ptr, grad_stride, order_ptr, contrib_feature_ptr,
                        bag_of_value_ptr, offsets_ptr, psw_ptr, meta_ptr, num_values, batch_size, HAS_PSW, BLOCK_Q)
            w_ptrs = weights_ptr + row + cols
            w = tl.load(w_ptrs, mask=col_mask, other=0.0).to(tl.float32)
            g = g + weight_decay * w
            if OPTIMIZER == 3:
                beta1 = tl.load(hparams_ptr + 3)
                beta2 = tl.load(hparams_ptr + 4)
                t = tl.load(step_ptr).to(tl.float32)
                m = beta1 * tl.load(state1_ptr + row + cols, mask=col_mask, other=0.0) + (1.0 - beta1) * g
                v = beta2 * tl.load(state2_ptr + row + cols, mask=col_mask, other=0.0) + (1.0 - beta2) * g * g
                tl.store(state1_ptr + row + cols, m, mask=col_mask)
                tl.store(state2_ptr + row + cols, v, mask=col_mask)
                m_hat = m / (1.0 - tl.exp(t * tl.log(beta1)))
                v_hat = v / (1.0 - tl.exp(t * tl.log(beta2)))
                w = w - lr * m_hat / (tl.sqrt(v_hat) + eps)
            else:
                w = w - step_size * g
            tl.store(w_ptrs, w.to(weights_ptr.dtype.element_ty), mask=col_mask)


def fused_update(grad_out: torch.Tensor, runs: Runs, contrib_feature: torch.Tensor, bag_of_value: torch.Tensor,
                 offsets: torch.Tensor, per_sample_weights: torch.Tensor | None, meta: torch.Tensor,
                 weights: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, hparams: torch.Tensor,
                 step: torch.Tensor, optimizer: int, max_dim: int) -> None:
    """Apply ``optimizer`` to every touched row of ``weights``, in place.

    Args as in ``pooled_bwd.rows_grad``, plus:
        weights: ``[W]`` flat tables (updated).
        state1: row-wise Adagrad ``[R]`` fp32 sums of mean squares (R = rows of all tables), or
            Adam ``[W]`` fp32 first moments; unused for SGD.
        state2: Adam ``[W]`` fp32 second moments; unused otherwise.
        hparams: ``[5]`` fp32 ``lr, eps, weight_decay, beta1, beta2``.
        step: ``[1]`` int64 step count, already counting this step (Adam's bias correction).
        optimizer: 1 SGD, 2 row-wise Adagrad, 3 Adam.
    """
    if statically_known_true(runs.sorted_rows.numel() == 0):
        return
    wrap_triton(_fused_update_kernel)[(persistent_programs(grad_out.device),)](
        grad_out, grad_out.stride(0), runs.sorted_rows, runs.order, runs.run_start, runs.run_end, runs.num_runs,
        contrib_feature, bag_of_value, offsets, per_sample_weights if per_sample_weights is not None else grad_out,
        meta, weights, state1, state2, hparams, step, bag_of_value.numel(), grad_out.shape[0],
        OPTIMIZER=optimizer, HAS_PSW=per_sample_weights is not None, BLOCK_D=block_d(max_dim))
