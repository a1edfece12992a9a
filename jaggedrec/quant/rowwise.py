"""Row-wise quantized storage: each row's values as small integers, with the row's own scale
and bias, so that ``value ~= q * scale + bias``.

Row layouts (INT8: codes then fp32 scale and bias; INT4: packed nibbles then fp16 scale and
bias; FP16: the values), strides and decoding live in ``jaggedrec/ops/quantized_rows.py``, beside
the ops that read them; this module makes such rows and takes a ``DataType`` where the op layer
takes a storage code (``STORAGE_CODES``).

Quantization: INT8 follows FBGEMM exactly (scale ``(max-min)/255``, bias ``min``, codes
``round((x-min) * 255/(max-min+1e-8))``), bit for bit the rows of
``torch.ops.quantized.embedding_bag_byte_prepack``. INT4 rounds its fp16 bias down and its fp16
scale up, so that every value lies in ``[bias, bias + 15*scale]`` after fp16 rounding: then no
code is clamped and each element's error is at most ``scale/2`` (FBGEMM rounds both to
nearest, which can clamp the row's maximum and err by more).

Range: a row whose quantized form would not be finite (an FP16 value, or an INT4 scale or
bias, past fp16's +-65504; an INT8 row spanning more than fp32 holds; NaN anywhere) is refused
with an error naming it (``fit_rows``), or, by choice, clamped into ``CLAMP_LIMIT`` first.
"""

from __future__ import annotations

import math

import torch

from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.ops import quantized_rows
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8

# the op layer's code for each storage type
STORAGE_CODES = {DataType.INT8: STORAGE_INT8, DataType.INT4: STORAGE_INT4, DataType.FP16: STORAGE_FP16}
_LEVELS = {DataType.INT8: 255, DataType.INT4: 15}
QUANT_TYPES = (DataType.INT8, DataType.INT4, DataType.FP16)


def storage_code(data_type: DataType) -> int:
    """The op layer's storage code (``STORAGE_INT8``, ...) of a quantized ``data_type``."""
    code = STORAGE_CODES.get(data_type)
    if code is None:
        raise ValueError(f"{data_type} is not a quantized storage type (INT8, INT4 or FP16)")
    return code


def data_bytes(data_type: DataType, dim: int) -> int:
    """Bytes of a row's values (codes, or fp16 values)."""
    return quantized_rows.data_bytes(storage_code(data_type), dim)


def row_bytes(data_type: DataType, dim: int, row_align: int) -> int:
    """A row's stride in bytes: its values plus scale and bias, rounded up to ``row_align``."""
    return quantized_rows.row_bytes(storage_code(data_type), dim, row_align)


ON_OVERFLOW = ("raise", "clamp")
# Values within +-limit always quantize to finite rows: fp16's largest value for FP16 and for
# INT4's fp16 scale and bias; for INT8, a range (2**127) whose fp32 scale, bias and
# dequantized values all stay finite.
CLAMP_LIMIT = {DataType.FP16: 65504.0, DataType.INT4: 65504.0, DataType.INT8: 2.0 ** 126}


def _scale_bias_of(w: torch.Tensor, data_type: DataType):
    """``[R]`` scale and bias of float rows ``w`` (INT8: fp32, FBGEMM's; INT4: fp16, the bias
    rounded down and the scale up)."""
    low, high = w.min(1).values, w.max(1).values
    if data_type == DataType.INT8:
        return (high - low) / 255.0, low
    bias = _round_half(low, down=True)
    scale = _round_half((high - bias.float()) / 15.0, down=False)
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # a constant row: any scale
    return scale, bias


def overflow_rows(weight: torch.Tensor, data_type: DataType) -> torch.Tensor:
    """``[R]`` bool: the rows of ``[R, D]`` float ``weight`` whose quantized form would not be
    finite: an FP16 value past fp16's range, an INT4 scale or bias past it (a row reaching
    below -65504, or spanning more than about 15 * 65504), an INT8 row whose fp32 scale times
    255, or its bias plus that, overflows (a span past about 3.4e38), or any infinite value."""
    w = weight.detach().float()
    if w.shape[0] == 0 or w.shape[1] == 0:
        return torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    if data_type == DataType.FP16:
        return w.abs().amax(1).half().isinf()
    scale, bias = _scale_bias_of(w, data_type)
    scale, bias = scale.float(), bias.float()
    top = scale * float(_LEVELS[data_type])
    return ~(torch.isfinite(scale) & torch.isfinite(bias) & torch.isfinite(top) & torch.isfinite(bias + top))


def fit_rows(weight: torch.Tensor, data_type: DataType, on_overflow: str = "raise", table: str = "weight"):
    """Check ``[R, D]`` float ``weight`` before it is quantized to ``data_type``.

    Returns ``(weight, clamped)``: under ``on_overflow="clamp"`` the rows that would overflow
    (:func:`overflow_rows`) clamped into ``+-CLAMP_LIMIT[data_type]`` and their count; else
    ``weight`` as it is and 0.

    Raises:
        ValueError naming ``table`` and its first bad row: NaN (always), or rows that would
            overflow under ``on_overflow="raise"``.
    """
    if on_overflow not in ON_OVERFLOW:
        raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
    w = weight.detach()
    nan = torch.isnan(w).any(1)
    if bool(nan.any()):
        raise ValueError(f"table '{table}': row {int(nan.nonzero()[0])} holds NaN ({int(nan.sum())} rows do); "
                         f"it cannot be quantized to {data_type.value}")
    bad = overflow_rows(w, data_type)
    count = int(bad.sum())
    if count == 0:
        return weight, 0
    if on_overflow == "raise":
        first = int(bad.nonzero()[0])
        row = w[first].float()
        raise ValueError(
            f"table '{table}': row {first} (values from {row.min().item():.4g} to {row.max().item():.4g}) does not "
            f"fit {data_type.value}{_WHY[data_type]}, so its quantized values would be inf or NaN ({count} rows "
            f"of {w.shape[0]} do): scale the table down, or pass on_overflow='clamp' to clamp such rows into "
            f"+-{CLAMP_LIMIT[data_type]:.6g}")
    limit = CLAMP_LIMIT[data_type]
    clamped = w.float().clone()  # in fp32: +-limit may not fit a narrower weight's dtype
    clamped[bad] = clamped[bad].clamp(-limit, limit)
    return clamped, count


_WHY = {DataType.FP16: " (fp16 holds values within +-65504)",
        DataType.INT4: " (its scale and bias are fp16, within +-65504)",
        DataType.INT8: " (its span, max - min, must stay within fp32's range)"}


def quantize_rows(weight: torch.Tensor, data_type: DataType, row_align: int = 1, table: str = "weight") -> torch.Tensor:
    """``[R, D]`` float rows -> ``[R, row_bytes]`` uint8 rows in ``data_type``'s layout (padding zero).

    Raises:
        ValueError naming ``table`` and the row, for a row that holds NaN or would overflow
            (:func:`fit_rows`; clamp with it first to quantize such rows).
    """
    fit_rows(weight, data_type, "raise", table)
    rows, dim = weight.shape
    stride = row_bytes(data_type, dim, row_align)
    out = torch.zeros(rows, stride, dtype=torch.uint8, device=weight.device)
    w = weight.detach().float()
    if data_type == DataType.FP16:
        out[:, :2 * dim] = w.half().view(torch.uint8).view(rows, 2 * dim)
        return out
    if rows == 0:
        return out
    scale, bias = _scale_bias_of(w, data_type)
    if data_type == DataType.INT8:
        low, high = bias, w.max(1).values
        codes = torch.round((w - low[:, None]) * (255.0 / (high - low + 1e-8))[:, None]).clamp_(0, 255)
        out[:, :dim] = codes.to(torch.uint8)
        out[:, stride - 8:stride - 4] = scale.contiguous().view(torch.uint8).view(rows, 4)
        out[:, stride - 4:] = bias.contiguous().view(torch.uint8).view(rows, 4)
        return out
    codes = torch.round((w - bias.float()[:, None]) / scale.float()[:, None]).clamp_(0, 15).to(torch.uint8)
    if dim % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    out[:, :(dim + 1) // 2] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out[:, stride - 4:stride - 2] = scale.contiguous().view(torch.uint8).view(rows, 2)
    out[:, stride - 2:] = bias.contiguous().view(torch.uint8).view(rows, 2)
    return out


def _round_half(x: torch.Tensor, down: bool) -> torch.Tensor:
    """fp16 nearest to ``x`` on the given side (``down``: <= x, else >= x)."""
    h = x.half()
    wrong = h.float() > x if down else h.float() < x
    toward = torch.full_like(h, -math.inf if down else math.inf)
    return torch.where(wrong, torch.nextafter(h, toward), h)


def scale_bias(rows: torch.Tensor, data_type: DataType, dim: int):
    """``[R]`` fp32 scales and biases of ``[R, stride]`` quantized rows (INT8, INT4)."""
    return quantized_rows.scale_bias(rows, storage_code(data_type))


def dequantize_rows(rows: torch.Tensor, data_type: DataType, dim: int) -> torch.Tensor:
    """``[R, stride]`` uint8 rows -> ``[R, D]`` fp32."""
    return quantized_rows.dequantize_rows(rows, storage_code(data_type), dim)


def error_bound(rows: torch.Tensor, data_type: DataType, dim: int) -> torch.Tensor:
    """``[R]`` the largest error of any dequantized element of each row: half a step (for
    FP16, half an fp16 ulp of the row's largest magnitude), padded by fp32's rounding of
    ``q * scale + bias``, and for INT8 by 1e-8: its codes round ``(x-min) * 255/(max-min+1e-8)``,
    not ``(x-min) / scale``, which moves a code by up to ``255e-8/(max-min)`` steps, 1e-8 in value
    (a visible part of a step in narrow rows: 4e-4 of it for rows in +-sqrt(1/100k))."""
    if data_type == DataType.FP16:
        values = dequantize_rows(rows, data_type, dim).abs().amax(1)
        return values * 2.0 ** -11 + 2.0 ** -25
    scale, bias = scale_bias(rows, data_type, dim)
    top = bias.double().abs() + _LEVELS[data_type] * scale.double()  # in fp32 it may overflow where no value does
    return (scale.double() / 2 + top * 2.0 ** -22 + (1e-8 if data_type == DataType.INT8 else 0.0)).float()

