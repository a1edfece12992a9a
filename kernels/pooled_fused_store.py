"""How the fused step (``pooled_fused``) writes what it stepped: optimizer state in its dtype
(fp32, or fp16/bf16 with the config's ``state_dtype``), rows in the table's dtype (rounded to
nearest or stochastically), and rows past ``max_norm`` scaled down to it first (the options of
``jaggedrec.optim.fused``; ``jaggedrec.ops.fused_rules_options`` is the torch path's)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stored(x, ptr):
    """fp32 ``x`` in the dtype of ``ptr`` (optimizer state in fp32, fp16 or bf16), rounded to
    nearest even: bf16 by hand, as the interpreter's cast truncates (a GPU's rounds to nearest)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x)  # NaN stays NaN
    return x.to(ptr.dtype.element_ty)


@triton.jit
def table_values(w, element, weights_ptr, hparams_ptr, t, STOCHASTIC: tl.constexpr):
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
def norm_scale(squares, hparams_ptr):
    """``max_norm / |w|`` where a stepped row's norm (``sqrt(squares)``, ``[BLOCK_U]``, from the
    fp32 values before they are stored) exceeds ``max_norm`` (``hparams[6]``), else 1: as
    FBGEMM's GPU step renormalises a row after its update."""
    max_norm = tl.load(hparams_ptr + 6)
    max_norm = tl.where(max_norm > 0.0, max_norm, float("inf"))  # 0: off
    norm = tl.sqrt(squares)
    over = norm > max_norm
    return tl.where(over, max_norm / tl.where(over, norm, 1.0), 1.0)
