"""``jaggedrec::quantized_embedding_bags``: every feature of a quantized bag collection in one op.

Tables live in one flat uint8 buffer per storage type (INT8, INT4, FP16; layouts in
``quantized_rows.py``). The op knows them through ``FeatureTables`` with ``storage`` and
``row_bytes`` set, byte offsets in ``weight_offsets``.

The torch path (CPU) pools with torch's own row-wise quantized embedding-bag ops, one call per
segment of same-type, same-dim features (``quantized_torch.py``); FP16 rows go through the
float path's widening sums. That path runs inside an opaque op (the 4-bit op has no fake
implementation), with a fake of its own. On CUDA one Triton launch pools every feature of
every storage type (``kernels/quant_fwd.py``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from jaggedrec.ops import quantized_torch
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8, feature_tables
from jaggedrec.ops.backends import batch_inputs, host_readable, use_kernels
from jaggedrec.ops.registry import define_host_op, define_op


def _fake(int8, int4, fp16, values, offsets, per_sample_weights, tables):
    decoded = feature_tables(tables)
    batch = (offsets.shape[0] - 1) // decoded.num_keys
    return values.new_empty((batch, sum(decoded.dims)), dtype=torch.float32)


def _quantized_forward(int8: torch.Tensor, int4: torch.Tensor, fp16: torch.Tensor, values: torch.Tensor,
                       offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                       tables: List[int]) -> torch.Tensor:
    decoded = feature_tables(tables)
    batch = (offsets.shape[0] - 1) // decoded.num_keys
    if batch == 0 or decoded.num_features == 0:
        return torch.zeros((batch, sum(decoded.dims)), dtype=torch.float32, device=values.device)
    if values.dtype != offsets.dtype:  # torch's quantized ops want one index dtype
        values, offsets = values.long(), offsets.long()
    psw = None if per_sample_weights is None else per_sample_weights.float().contiguous()
    buffers = {STORAGE_INT8: int8, STORAGE_INT4: int4, STORAGE_FP16: fp16}
    return quantized_torch.quantized_forward(buffers, values.contiguous(), offsets.contiguous(), psw, decoded)


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
        from jaggedrec.ops import quantized_triton  # imported lazily: it pulls in the kernels
        values, offsets, per_sample_weights, _ = batch_inputs(values, offsets, per_sample_weights)
        return quantized_triton.triton_forward(int8, int4, fp16, values, offsets, per_sample_weights, decoded)
    pooled = torch.ops.jaggedrec.quantized_embedding_bags_host(int8, int4, fp16, values, offsets, per_sample_weights,
                                                               tables)
    return pooled, torch.zeros(decoded.num_features, dtype=torch.int64, device=values.device)


@torch.fx.wrap  # one node of a torch.fx graph: it branches on its arguments
def run_quantized_embedding_bags(int8: torch.Tensor, int4: torch.Tensor, fp16: torch.Tensor, values: torch.Tensor,
                                 offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor], tables: List[int],
                                 backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantized_embedding_bags` as the module calls it. An eager CPU forward runs the
    torch path's body without the dispatcher (two custom ops' machinery, ~0.08 ms a call on
    this 2-core Xeon, 2-3% of a dlrm-preset forward); a compiled or traced graph, fake
    tensors and the kernels go through the op."""
    if use_kernels(backend, values.device) or not host_readable(int8, int4, fp16, values, offsets):
        return quantized_embedding_bags(int8, int4, fp16, values, offsets, per_sample_weights, tables, backend)
    pooled = _quantized_forward(int8, int4, fp16, values, offsets, per_sample_weights, tables)
    return pooled, torch.zeros(feature_tables(tables).num_features, dtype=torch.int64)
