"""The byte layout of a quantized table's rows, by storage type (``feature_tables.STORAGE_*``).

Row layouts, in bytes (``D`` the embedding dim), chosen so that torch's own quantized
embedding-bag ops (FBGEMM's layouts) read a block of same-dim CPU rows as they are:

* INT8: ``D`` uint8 codes, then fp32 scale and fp32 bias (8 bytes);
* INT4: ``ceil(D/2)`` bytes, code ``2j`` in the low nibble of byte ``j`` and ``2j+1`` in the
  high one, then fp16 scale and fp16 bias (4 bytes);
* FP16: ``D`` fp16 values, no scale or bias.

A row's stride is its size rounded up to ``row_align`` bytes: 16 for rows a GPU reads (the
codes then start on 16-byte boundaries, for vector loads), 1 on CPU (torch's ops need the
exact layout). The scale and bias always fill a row's last bytes, so that a row's value is
``code * scale + bias``.

How rows are made (and checked for range) is the quantizer's business (``jaggedrec.quant``);
this module only reads them.
"""

from __future__ import annotations

from typing import Tuple

import torch

from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8

# bytes of scale plus bias at the end of a row
META_BYTES = {STORAGE_INT8: 8, STORAGE_INT4: 4, STORAGE_FP16: 0}
STORAGE_NAMES = {STORAGE_INT8: "INT8", STORAGE_INT4: "INT4", STORAGE_FP16: "FP16"}


def data_bytes(storage: int, dim: int) -> int:
    """Bytes of a row's values (codes, or fp16 values)."""
    if storage == STORAGE_INT8:
        return dim
    if storage == STORAGE_INT4:
        return (dim + 1) // 2
    if storage == STORAGE_FP16:
        return 2 * dim
    raise ValueError(f"storage code {storage} is not a quantized storage type ({STORAGE_NAMES})")


def row_bytes(storage: int, dim: int, row_align: int = 1) -> int:
    """A row's stride in bytes: its values plus scale and bias, rounded up to ``row_align``."""
    size = data_bytes(storage, dim) + META_BYTES[storage]
    return -(-size // row_align) * row_align


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A dense copy with fresh strides: the dtype views below need offsets and strides aligned to
    their element size, which neither contiguous() (a one-row slice counts as contiguous at any
    offset) nor clone() (it keeps such a slice's strides) promises."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def scale_bias(rows: torch.Tensor, storage: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[R]`` fp32 scales and biases of ``[R, stride]`` quantized rows (INT8, INT4)."""
    stride = rows.shape[1]
    meta = _fresh(rows[:, stride - META_BYTES[storage]:])
    if storage == STORAGE_INT8:
        pair = meta.view(torch.float32)
    else:
        pair = meta.view(torch.float16).float()
    return pair[:, 0], pair[:, 1]


def dequantize_rows(rows: torch.Tensor, storage: int, dim: int) -> torch.Tensor:
    """``[R, stride]`` uint8 rows -> ``[R, D]`` fp32."""
    if storage == STORAGE_FP16:
        return _fresh(rows[:, :2 * dim]).view(torch.float16).float()
    if storage == STORAGE_INT8:
        codes = rows[:, :dim].float()
    else:
        packed = rows[:, :(dim + 1) // 2]
        codes = torch.stack([packed & 15, packed >> 4], dim=2).reshape(rows.shape[0], 2 * packed.shape[1])
        codes = codes[:, :dim].float()
    scale, bias = scale_bias(rows, storage)
    return codes * scale[:, None] + bias[:, None]
