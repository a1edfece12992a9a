"""``jaggedrec::quantized_embedding_bags``: every feature of a quantized bag collection in one op.

Tables live in one flat uint8 buffer per storage type (INT8, INT4, FP16; layouts in
``quant/rowwise.py``). The op knows them through ``FeatureTables`` with ``storage`` and
``row_bytes`` set, byte offsets in ``weight_offsets``.

The torch path (CPU) pools each feature with torch's own row-wise quantized embedding-bag
ops (``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` and the 4-bit one, FBGEMM's
CPU kernels, which ship with torch): they read the codes, scale and bias of each row and sum
in fp32. FP16 rows go through the float path's widening sums. That path runs inside an opaque
op (the 4-bit op has no fake implementation), with a fake of its own. On CUDA one Triton
launch pools every feature of every storage type (``kernels/quant_fwd.py``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import pooled_torch
from .feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8, FeatureTables, feature_tables
from .backends import batch_inputs, use_kernels
from .registry import define_host_op, define_op


def _fake(int8, int4, fp16, values, offsets, per_sample_weights, tables):
    decoded = feature_tables(tables)
    batch = (offsets.shape[0] - 1) // decoded.num_keys
    return values.new_empty((batch, sum(decoded.dims)), dtype=torch.float32)


def _table_rows(buffers, tables: FeatureTables, f: int) -> torch.Tensor:
    """``[rows, row_bytes]`` uint8 view of feature ``f``'s table."""
    buffer = buffers[tables.storage[f]]
    return buffer.narrow(0, tables.weight_offsets[f], tables.rows[f] * tables.row_bytes[f]).view(
        tables.rows[f], tables.row_bytes[f])


def pool_feature(rows: torch.Tensor, storage: int, dim: int, ids: torch.Tensor, bag_offsets: torch.Tensor,
                 psw: Optional[torch.Tensor], mean: bool) -> torch.Tensor:
    """``[B, dim]`` fp32 bag sums (MEAN: means, 0 for empty bags) of a quantized table's rows.

    Args:
        rows: ``[R, row_bytes]`` uint8; ids: ``[N]``; bag_offsets: ``[B+1]`` from 0, in the ids' dtype.
    """
    if storage == STORAGE_FP16:
        table = rows.narrow(1, 0, 2 * dim).view(torch.float16)
        pooled = pooled_torch._pooled_rows(ids, table, bag_offsets, psw, False)
    elif rows.device.type != "cpu" or rows.shape[1] != _packed_bytes(storage, dim):
        # torch's ops need their exact CPU layout; padded rows (row_align > 1) are dequantized here
        pooled = _dequantized_sums(rows, storage, dim, ids, bag_offsets, psw)
    else:
        op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if storage == STORAGE_INT8
              else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
        weights = None if psw is None else psw.float()
        pooled = op(rows, ids, bag_offsets, False, 0, False, weights, None, True)
        if pooled.shape[1] != dim:  # an odd dim's last nibble is padding
            pooled = pooled.narrow(1, 0, dim)
    if mean:
        pooled = pooled / (bag_offsets[1:] - bag_offsets[:-1]).clamp(min=1).to(torch.float32).unsqueeze(1)
    return pooled


def _packed_bytes(storage: int, dim: int) -> int:
    return dim + 8 if storage == STORAGE_INT8 else (dim + 1) // 2 + 4


def _dequantized_sums(rows, storage, dim, ids, bag_offsets, psw) -> torch.Tensor:
    """``[B, dim]`` fp32 bag sums: the bags' rows gathered, dequantized, weighted, summed."""
    from ..quant.rowwise import dequantize_rows
    from ..configs import DataType
    data_type = DataType.INT8 if storage == STORAGE_INT8 else DataType.INT4
    values = dequantize_rows(rows.index_select(0, ids.long()), data_type, dim)
    if psw is not None:
        values = values * psw.float().unsqueeze(1)
    positions = torch.arange(ids.shape[0], dtype=bag_offsets.dtype, device=ids.device)
    return torch.nn.functional.embedding_bag(positions, values, bag_offsets, mode="sum", include_last_offset=True)


def _quantized_forward(int8: torch.Tensor, int4: torch.Tensor, fp16: torch.Tensor, values: torch.Tensor,
                       offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                       tables: List[int]) -> torch.Tensor:
    decoded = feature_tables(tables)
    num_keys = decoded.num_keys
    batch = (offsets.shape[0] - 1) // num_keys
    if batch == 0:
        return torch.zeros((0, sum(decoded.dims)), dtype=torch.float32, device=values.device)
    buffers = {STORAGE_INT8: int8, STORAGE_INT4: int4, STORAGE_FP16: fp16}
    if values.dtype != offsets.dtype:  # torch's quantized ops want one index dtype
        values, offsets = values.long(), offsets.long()
    values, offsets = values.contiguous(), offsets.contiguous()
    starts = offsets[::batch].tolist()
    pieces = []
    for f in range(decoded.num_features):
        k = decoded.keys[f]
        first, last = starts[k], starts[k + 1]
        bag_offsets = offsets[k * batch:(k + 1) * batch + 1] - first
        psw = None if per_sample_weights is None else per_sample_weights[first:last].contiguous()
        pieces.append(pool_feature(_table_rows(buffers, decoded, f), decoded.storage[f], decoded.dims[f],
                                   values[first:last], bag_offsets, psw, bool(decoded.pooling[f])))
    if not pieces:
        return torch.zeros((batch, 0), dtype=torch.float32, device=values.device)
    return torch.cat(pieces, dim=1)


define_host_op("jaggedrec::quantized_embedding_bags_host", fake=_fake)(_quantized_forward)


@define_op("jaggedrec::quantized_embedding_bags")
def quantized_embedding_bags(int8: torch.Tensor, int4: torch.Tensor, fp16: torch.Tensor, values: torch.Tensor,
                             offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor], tables: List[int],
                             backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pool each feature's rows from its quantized table.

    Args:
        int8, int4, fp16: each storage type's flat uint8 buffer (empty when unused).
        values: ``[N]`` int32/int64 ids; offsets: ``[K*B+1]`` bag starts; per_sample_weights: ``[N]`` or None.
        tables: ``FeatureTables.encode()`` with ``storage`` and ``row_bytes`` (byte offsets).
        backend: "auto" (the kernels on CUDA), "torch" or "triton".
    Returns:
        ``[B, sum(dims)]`` fp32, and ``[F]`` int64 counts of the ids outside their tables, which
        the kernel skips (zero on the torch path, whose callers validate ids first).
    """
    decoded = feature_tables(tables)
    if use_kernels(backend, values.device):
        from . import quantized_triton  # imported lazily: it pulls in the kernels
        values, offsets, per_sample_weights = batch_inputs(values, offsets, per_sample_weights)
        return quantized_triton.triton_forward(int8, int4, fp16, values, offsets, per_sample_weights, decoded)
    pooled = torch.ops.jaggedrec.quantized_embedding_bags_host(int8, int4, fp16, values, offsets, per_sample_weights,
                                                               tables)
    return pooled, torch.zeros(decoded.num_features, dtype=torch.int64, device=values.device)
