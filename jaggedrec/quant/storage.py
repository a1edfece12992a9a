"""Where each quantized table lives: one flat uint8 buffer per storage type (INT8, INT4,
FP16), tables of one dim side by side in it, so that a block of same-dim rows is one
``[rows, row_bytes]`` view (what torch's quantized embedding-bag ops take)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from jaggedrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8, FeatureTables
from jaggedrec.quant.rowwise import QUANT_TYPES, row_bytes

STORAGE_CODES = {DataType.INT8: STORAGE_INT8, DataType.INT4: STORAGE_INT4, DataType.FP16: STORAGE_FP16}


@dataclass(frozen=True)
class QuantTableSlot:
    name: str
    data_type: DataType
    rows: int
    dim: int
    row_bytes: int  # the row stride
    offset: int     # first byte in its storage type's buffer


class QuantLayout:
    """Slots for ``configs`` (each config's ``data_type`` one of INT8, INT4, FP16).

    Attributes:
        tables: one slot per config, in config order.
        buffer_bytes: bytes of each storage type's buffer, for the types present.
    """

    def __init__(self, configs: Sequence[EmbeddingBagConfig], row_align: int) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names: {sorted({n for n in names if names.count(n) > 1})}")
        if not configs:
            raise ValueError("an embedding collection needs at least one table")
        for c in configs:
            if c.data_type not in QUANT_TYPES:
                raise ValueError(f"table '{c.name}': a quantized collection stores INT8, INT4 or FP16 rows, "
                                 f"got {c.data_type}")
        _check_row_align(configs, row_align)
        self.configs = list(configs)
        self.row_align = row_align
        slots: Dict[int, QuantTableSlot] = {}
        self.buffer_bytes: Dict[DataType, int] = {}
        for data_type in QUANT_TYPES:
            members = sorted((i for i, c in enumerate(configs) if c.data_type == data_type),
                             key=lambda i: configs[i].embedding_dim)
            if not members:
                continue
            cursor = 0
            for i in members:
                c = configs[i]
                stride = row_bytes(data_type, c.embedding_dim, row_align)
                slots[i] = QuantTableSlot(c.name, data_type, c.num_embeddings, c.embedding_dim, stride, cursor)
                cursor += c.num_embeddings * stride
            self.buffer_bytes[data_type] = cursor
        self.tables: List[QuantTableSlot] = [slots[i] for i in range(len(configs))]

    def features(self) -> List[Tuple[str, str, int]]:
        """``(KJT key, output name, table)`` per output feature, in TorchRec's order (tables in
        config order, then each table's features); a feature read by several tables is named
        ``feature@table``."""
        uses: Dict[str, int] = {}
        for c in self.configs:
            for f in c.feature_names:
                uses[f] = uses.get(f, 0) + 1
        return [(f, f"{f}@{c.name}" if uses[f] > 1 else f, t)
                for t, c in enumerate(self.configs) for f in c.feature_names]


def _check_row_align(configs: Sequence[EmbeddingBagConfig], row_align: int) -> None:
    """FP16 rows are read in place as fp16 values, so their strides (and so every FP16 table's
    offset, a sum of strides) must be even; INT8 and INT4 rows take any stride."""
    if isinstance(row_align, bool) or not isinstance(row_align, numbers.Integral):
        raise TypeError(f"row_align must be an int, got {type(row_align).__name__}")
    if row_align < 1:
        raise ValueError(f"row_align must be at least 1, got {row_align}")
    for c in configs:
        stride = row_bytes(c.data_type, c.embedding_dim, row_align)
        if c.data_type == DataType.FP16 and stride % 2:
            raise ValueError(f"table '{c.name}' (FP16, dim {c.embedding_dim}): row_align={row_align} gives rows of "
                             f"{stride} bytes, but FP16 rows are read as 2-byte values and need an even stride: "
                             f"use row_align 1 (no padding) or an even one (16 on CUDA)")


@dataclass(frozen=True)
class QuantGroup:
    """All of a quantized collection's features, as ``batch.read_batch`` takes a storage group:
    the KJT key each reads, and the op's ``tables`` argument once those keys are located."""

    features: Tuple[int, ...]  # positions among the collection's output features: all of them
    key_names: Tuple[str, ...]
    weight_offsets: Tuple[int, ...]
    rows: Tuple[int, ...]
    dims: Tuple[int, ...]
    pooling: Tuple[int, ...]
    storage: Tuple[int, ...]
    row_bytes: Tuple[int, ...]

    def feature_tables(self, keys: Sequence[int], num_keys: int) -> List[int]:
        return FeatureTables(self.weight_offsets, self.rows, self.dims, tuple(keys), self.pooling, num_keys,
                             self.storage, self.row_bytes).encode()
