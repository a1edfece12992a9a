"""Row-wise quantized storage: each row's values as small integers, with the row's own scale
and bias, so that ``value ~= q * scale + bias``.

Row layouts, in bytes (``D`` the embedding dim), chosen so that torch's own quantized
embedding-bag ops (FBGEMM's layouts) read a block of same-dim CPU rows as they are:

* INT8: ``D`` uint8 codes, then fp32 scale and fp32 bias (8 bytes);
* INT4: ``ceil(D/2)`` bytes, code ``2j`` in the low nibble of byte ``j`` and ``2j+1`` in the
  high one, then fp16 scale and fp16 bias (4 bytes);
* FP16: ``D`` fp16 values, no scale or bias.

A row's stride is its size rounded up to ``row_align`` bytes: 16 for rows a GPU reads (the
codes then start on 16-byte boundaries, for vector loads), 1 on CPU (torch's ops need the
exact layout). The scale and bias always fill a row's last bytes.

Quantization: INT8 follows FBGEMM exactly (scale ``(max-min)/255``, bias ``min``, codes
``round((x-min) * 255/(max-min+1e-8))``), bit for bit the rows of
``torch.ops.quantized.embedding_bag_byte_prepack``. INT4 rounds its fp16 bias down and its fp16
scale up, so that every value lies in ``[bias, bias + 15*scale]`` after fp16 rounding: then no
code is clamped and each element's error is at most ``scale/2`` (FBGEMM rounds both to
nearest, which can clamp the row's maximum and err by more).
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from ..configs import DataType

# bytes of scale plus bias at the end of a row
_META_BYTES = {DataType.INT8: 8, DataType.INT4: 4, DataType.FP16: 0}
_LEVELS = {DataType.INT8: 255, DataType.INT4: 15}
QUANT_TYPES = (DataType.INT8, DataType.INT4, DataType.FP16)


def data_bytes(data_type: DataType, dim: int) -> int:
    """Bytes of a row's values (codes, or fp16 values)."""
    if data_type == DataType.INT8:
        return dim
    if data_type == DataType.INT4:
        return (dim + 1) // 2
    if data_type == DataType.FP16:
        return 2 * dim
    raise ValueError(f"{data_type} is not a quantized storage type (INT8, INT4 or FP16)")


def row_bytes(data_type: DataType, dim: int, row_align: int) -> int:
    """A row's stride in bytes: its values plus scale and bias, rounded up to ``row_align``."""
    size = data_bytes(data_type, dim) + _META_BYTES[data_type]
    return -(-size // row_align) * row_align


def quantize_rows(weight: torch.Tensor, data_type: DataType, row_align: int = 1) -> torch.Tensor:
    """``[R, D]`` float rows -> ``[R, row_bytes]`` uint8 rows in ``data_type``'s layout (padding zero)."""
    rows, dim = weight.shape
    stride = row_bytes(data_type, dim, row_align)
    out = torch.zeros(rows, stride, dtype=torch.uint8, device=weight.device)
    w = weight.detach().float()
    if data_type == DataType.FP16:
        out[:, :2 * dim] = w.half().view(torch.uint8).view(rows, 2 * dim)
        return out
    if rows == 0:
        return out
    low, high = w.min(1).values, w.max(1).values
    if data_type == DataType.INT8:
        scale, bias = (high - low) / 255.0, low
        codes = torch.round((w - low[:, None]) * (255.0 / (high - low + 1e-8))[:, None]).clamp_(0, 255)
        out[:, :dim] = codes.to(torch.uint8)
        out[:, stride - 8:stride - 4] = scale.contiguous().view(torch.uint8).view(rows, 4)
        out[:, stride - 4:] = bias.contiguous().view(torch.uint8).view(rows, 4)
        return out
    bias = _round_half(low, down=True)
    scale = _round_half((high - bias.float()) / 15.0, down=False)
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # a constant row: any scale
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


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A dense copy with fresh strides: the dtype views below need offsets and strides aligned to
    their element size, which neither contiguous() (a one-row slice counts as contiguous at any
    offset) nor clone() (it keeps such a slice's strides) promises."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def scale_bias(rows: torch.Tensor, data_type: DataType, dim: int):
    """``[R]`` fp32 scales and biases of ``[R, stride]`` quantized rows (INT8, INT4)."""
    stride = rows.shape[1]
    meta = _fresh(rows[:, stride - _META_BYTES[data_type]:])
    if data_type == DataType.INT8:
        pair = meta.view(torch.float32)
    else:
        pair = meta.view(torch.float16).float()
    return pair[:, 0], pair[:, 1]


def dequantize_rows(rows: torch.Tensor, data_type: DataType, dim: int) -> torch.Tensor:
    """``[R, stride]`` uint8 rows -> ``[R, D]`` fp32."""
    if data_type == DataType.FP16:
        return _fresh(rows[:, :2 * dim]).view(torch.float16).float()
    if data_type == DataType.INT8:
        codes = rows[:, :dim].float()
    else:
        packed = rows[:, :(dim + 1) // 2]
        codes = torch.stack([packed & 15, packed >> 4], dim=2).reshape(rows.shape[0], 2 * packed.shape[1])
        codes = codes[:, :dim].float()
    scale, bias = scale_bias(rows, data_type, dim)
    return codes * scale[:, None] + bias[:, None]


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
    top = bias.abs() + _LEVELS[data_type] * scale
    return scale / 2 + top * 2.0 ** -22 + (1e-8 if data_type == DataType.INT8 else 0.0)

