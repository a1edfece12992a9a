"""The Triton path of quantized embedding bags: one launch over every feature (``kernels/quant_fwd.py``),
or, for batches of about one id per bag, one pipelined launch per storage type present
(``kernels/quant_fwd_short.py``) and the general kernel's pass over the few longer bags."""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from jaggedrec.kernels import quant_fwd, quant_fwd_short

from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import OpBatch
from jaggedrec.ops.pooled_triton import short_length


def _meta_rows(tables: FeatureTables) -> Tuple[Tuple[int, ...], ...]:
    columns, rows = 0, []
    for f in range(tables.num_features):
        rows.append((tables.weight_offsets[f], tables.dims[f], tables.rows[f], columns, tables.keys[f],
                     tables.pooling[f], tables.storage[f], tables.row_bytes[f], f))
        columns += tables.dims[f]
    return tuple(rows)


@functools.lru_cache(maxsize=256)
def _cached_meta(meta_rows, device: torch.device) -> torch.Tensor:
    return torch.tensor(meta_rows, dtype=torch.int64, device=device)


def _alignment(values, largest: int = 16) -> int:
    """The largest power of two (at most ``largest``) dividing every one of ``values``."""
    align = largest
    while any(x % align for x in values):
        align //= 2
    return align


def dim_alignment(dims) -> int:
    """The kernel's DIM_ALIGN: the largest power of two up to 32 dividing every dim. Up to 32,
    not 16 as for rows of floats: an INT4 row's codes are ``dim // 2`` bytes, which the compiler
    loads 16 at a time only when it knows them a multiple of 16."""
    return _alignment(dims, 32)


def triton_forward(int8: torch.Tensor, int4: torch.Tensor, fp16: torch.Tensor, values: torch.Tensor,
                   offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor], tables: FeatureTables):
    """``[B, sum(dims)]`` fp32 pooled output and ``[F]`` int64 counts of skipped bad ids."""
    align = _alignment((*tables.row_bytes, *tables.weight_offsets))
    if align < 4:
        # a row's fp32 (INT8) or fp16 (INT4) scale and bias must be aligned for the GPU to load them
        raise ValueError(f"the Triton kernel needs row strides and table offsets that are multiples of 4 bytes, got "
                         f"alignment {align}: build the quantized collection with row_align=16 (the default on "
                         f"CUDA), or from_float on a CUDA collection")
    rows = _meta_rows(tables)
    meta = _meta(rows, values)
    batch = (offsets.shape[0] - 1) // tables.num_keys
    out = torch.empty((batch, sum(tables.dims)), dtype=torch.float32, device=values.device)
    errors = torch.zeros(tables.num_features, dtype=torch.int64, device=values.device)
    batch_ = OpBatch(values, offsets, per_sample_weights)
    max_dim, dim_align = max(tables.dims), dim_alignment(tables.dims)
    short = short_length(values.shape[0], offsets.shape[0] - 1, max_dim) if max_dim <= quant_fwd_short.MAX_DIM else 0
    if short:
        for storage, buffer in zip((1, 2, 3), (int8, int4, fp16)):
            of_storage = tuple(row for row in rows if row[6] == storage)
            if of_storage:
                dims = [row[1] for row in of_storage]
                quant_fwd_short.quant_fwd_short(buffer, values, offsets, per_sample_weights,
                                                _meta(of_storage, values), out, errors, max(dims), storage, align,
                                                dim_align, short)
    quant_fwd.quant_fwd((int8, int4, fp16), batch_, meta, out, errors, max_dim, align, dim_align, short)
    return out, errors


def _meta(rows, values: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or is_fake(values):
        return torch.tensor(rows, dtype=torch.int64, device=values.device)
    return _cached_meta(rows, values.device)
