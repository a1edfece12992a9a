"""Where each quantized table lives: ``TableLayout`` (the collections' one layout) with one flat
uint8 buffer per storage type (INT8, INT4, FP16), tables of one dim side by side in it, so
that a block of same-dim rows is one ``[rows, row_bytes]`` view (what torch's quantized
embedding-bag ops take). Every feature is served by one op call, over all three buffers."""

from __future__ import annotations

import numbers
from typing import List, Sequence

import torch

from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig, DataType, EmbeddingBagConfig
from jaggedrec.modules.table_layout import StorageGroup, TableLayout
from jaggedrec.quant.rowwise import QUANT_TYPES, STORAGE_CODES, row_bytes

# each storage type's buffer: the module's ``qweights_<name>``
BUFFER_NAMES = {DataType.INT8: "int8", DataType.INT4: "int4", DataType.FP16: "fp16"}


class QuantLayout(TableLayout):
    """Slots for ``configs`` (each config's ``data_type`` one of INT8, INT4, FP16): offsets and
    strides in bytes, each storage type's tables in its own buffer (``storage_sizes``: its
    bytes), rows of ``row_bytes(data_type, dim, row_align)``, no gaps between same-type blocks.
    ``groups`` holds one group, every feature in output order."""

    block_align = 1

    def __init__(self, configs: Sequence[EmbeddingBagConfig], row_align: int) -> None:
        self.row_align = row_align  # read by the checks and strides below
        super().__init__(configs, EmbeddingBagConfig)

    def check_data_types(self) -> None:
        for c in self.configs:
            if c.data_type not in QUANT_TYPES:
                raise ValueError(f"table '{c.name}': a quantized collection stores INT8, INT4 or FP16 rows, "
                                 f"got {c.data_type}")
        _check_row_align(self.configs, self.row_align)

    def storage_order(self) -> List[DataType]:
        return [t for t in QUANT_TYPES if any(c.data_type == t for c in self.configs)]

    def row_stride(self, config: BaseEmbeddingConfig) -> int:
        return row_bytes(config.data_type, config.embedding_dim, self.row_align)

    def group_of(self, data_type: DataType, order: List[DataType]) -> int:
        return 0

    def make_groups(self, order: List[DataType]) -> List[StorageGroup]:
        features = range(len(self.features))
        storage = tuple(STORAGE_CODES[self.tables[self.features[i].table].data_type] for i in features)
        return [self.feature_group("quantized", torch.uint8, sum(self.storage_sizes.values()), features, storage)]


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
