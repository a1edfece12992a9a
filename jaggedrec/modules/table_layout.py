"""Where every table and feature of a collection lives in flat storage.

``TableLayout`` is what every collection (float bag and sequence, quantized bag) shares: the
configs checked, the output features in TorchRec's order and names (``feature@table`` for a
feature several tables read), each table's slot in flat storage, and the groups of features
that one op call serves. How a table is stored is the one thing a subclass changes
(``row_stride``, ``storage_order``, ``make_groups``, ``check_data_types``):

* float (this class): tables of one dtype share one flat ``[W]`` tensor, so that one launch
  can reach every table; one storage group, and one op call, per dtype.
* quantized (``jaggedrec.quant.storage.QuantLayout``): one uint8 buffer per storage type,
  rows of ``row_bytes``; one op call over every feature.

Within a flat tensor, tables are ordered by embedding dim, so that all tables of one dim form
one contiguous ``[rows, stride]`` block (the torch path serves a whole block with one call),
and each block starts on a ``block_align`` boundary (32 elements for float tables: aligned
vector loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Type

import torch

from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig, DataType, PoolingType
from jaggedrec.ops.feature_tables import FeatureTables

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class TableSlot:
    name: str
    rows: int
    dim: int
    group: int   # index of the storage group whose op call reads it
    offset: int  # first element of the table in its flat tensor
    stride: int  # elements from one row to the next: the dim, or a quantized row's bytes
    data_type: DataType


@dataclass(frozen=True)
class FeatureSlot:
    feature: str         # KJT key it reads
    embedding_name: str  # output key: the feature name, or "feature@table" when shared
    table: int
    pooling: int         # 0 SUM, 1 MEAN


@dataclass(frozen=True)
class StorageGroup:
    """The features one op call serves, in output order, and the flat tensor they read (float:
    one per dtype; quantized: one over the storage types' buffers)."""

    name: str  # float: "fp32", "fp16", "bf16", the parameter's name
    dtype: torch.dtype
    numel: int
    features: Tuple[int, ...]
    # Per feature, in the op's argument form:
    key_names: Tuple[str, ...]  # the KJT key it reads
    weight_offsets: Tuple[int, ...]
    rows: Tuple[int, ...]
    dims: Tuple[int, ...]
    pooling: Tuple[int, ...]
    storage: Tuple[int, ...] = ()    # quantized only: storage codes (``ops/feature_tables.py``)
    row_bytes: Tuple[int, ...] = ()  # quantized only: row strides in bytes

    def feature_tables(self, keys: Sequence[int], num_keys: int) -> List[int]:
        """The ops' ``tables`` argument for a KJT of ``num_keys`` keys in which feature ``i``
        of this group reads key ``keys[i]`` (see ``ops/feature_tables.py``)."""
        return FeatureTables(self.weight_offsets, self.rows, self.dims, tuple(keys), self.pooling,
                             num_keys, self.storage, self.row_bytes).encode()


class TableLayout:
    """Flat-storage plan for a list of table configs (``EmbeddingBagConfig`` or ``EmbeddingConfig``).

    Attributes:
        configs: the configs, in order.
        tables: one slot per config, in config order.
        features: one slot per output feature, in output order (table order, then each
            table's ``feature_names``), which is TorchRec's KeyedTensor order.
        storage_sizes: per data type present, the size of its flat tensor (elements; bytes
            for quantized rows).
        groups: the op calls' feature groups (float: one per dtype, in order of first appearance).
    """

    block_align = 32  # each same-dim block's first element: a multiple of this

    def __init__(self, configs: Sequence[BaseEmbeddingConfig],
                 config_type: Type[BaseEmbeddingConfig] = BaseEmbeddingConfig) -> None:
        for c in configs:
            if not isinstance(c, config_type):
                raise TypeError(f"tables must be {config_type.__name__}, got {type(c).__name__}")
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate table names: {duplicates}")
        self.configs = list(configs)
        self.check_data_types()

        uses: Dict[str, int] = {}
        for c in configs:
            for f in c.feature_names:
                uses[f] = uses.get(f, 0) + 1
        self.features = [
            FeatureSlot(f, f"{f}@{c.name}" if uses[f] > 1 else f, t,
                        int(getattr(c, "pooling", None) == PoolingType.MEAN))
            for t, c in enumerate(configs) for f in c.feature_names]

        order = self.storage_order()
        offsets: Dict[int, int] = {}
        self.storage_sizes: Dict[DataType, int] = {}
        for data_type in order:
            members = [i for i, c in enumerate(configs) if c.data_type == data_type]
            cursor, last_dim = 0, None
            for i in sorted(members, key=lambda i: configs[i].embedding_dim):
                if configs[i].embedding_dim != last_dim:
                    cursor = -(-cursor // self.block_align) * self.block_align
                    last_dim = configs[i].embedding_dim
                offsets[i] = cursor
                cursor += configs[i].num_embeddings * self.row_stride(configs[i])
            self.storage_sizes[data_type] = cursor
        self.tables = [TableSlot(c.name, c.num_embeddings, c.embedding_dim, self.group_of(c.data_type, order),
                                 offsets[i], self.row_stride(c), c.data_type)
                       for i, c in enumerate(configs)]
        self.groups: List[StorageGroup] = self.make_groups(order)

    # --- what a storage kind decides ---------------------------------------------------------
    def check_data_types(self) -> None:
        """Refuse configs whose ``data_type`` this storage cannot hold (float: INT8 and INT4,
        which ``DataType.to_torch`` refuses with a pointer to quantization)."""
        for c in self.configs:
            c.data_type.to_torch()

    def storage_order(self) -> List[DataType]:
        """The data types present, in the order their flat tensors are made (float: first use)."""
        return list(dict.fromkeys(c.data_type for c in self.configs))

    def row_stride(self, config: BaseEmbeddingConfig) -> int:
        """Elements from one row of ``config``'s table to the next in its flat tensor."""
        return config.embedding_dim

    def group_of(self, data_type: DataType, order: List[DataType]) -> int:
        """The storage group holding tables of ``data_type`` (float: one group per dtype)."""
        return order.index(data_type)

    def make_groups(self, order: List[DataType]) -> List[StorageGroup]:
        """One group per flat tensor (float: per dtype, named by it)."""
        groups = []
        for g, data_type in enumerate(order):
            dtype = data_type.to_torch()
            features = tuple(i for i, s in enumerate(self.features) if self.tables[s.table].group == g)
            groups.append(self.feature_group(_DTYPE_NAMES[dtype], dtype, self.storage_sizes[data_type], features))
        return groups

    def feature_group(self, name: str, dtype: torch.dtype, numel: int, features: Sequence[int],
                      storage: Tuple[int, ...] = ()) -> StorageGroup:
        """A ``StorageGroup`` serving ``features`` (positions in ``self.features``); ``storage``:
        per feature, a quantized op's storage code (row strides then come along)."""
        tabs = [self.tables[self.features[i].table] for i in features]
        return StorageGroup(name, dtype, numel, tuple(features), tuple(self.features[i].feature for i in features),
                            tuple(t.offset for t in tabs), tuple(t.rows for t in tabs), tuple(t.dim for t in tabs),
                            tuple(self.features[i].pooling for i in features), tuple(storage),
                            tuple(t.stride for t in tabs) if storage else ())

    # --- what every collection reads -----------------------------------------------------------
    @property
    def embedding_names(self) -> List[str]:
        return [f.embedding_name for f in self.features]

    @property
    def feature_names(self) -> List[str]:
        """Distinct KJT keys the collection reads, in first-use order."""
        return list(dict.fromkeys(f.feature for f in self.features))

    def embedding_dims(self) -> List[int]:
        return [self.tables[f.table].dim for f in self.features]

    def column_runs(self) -> List[Tuple[int, int, int]]:
        """How to assemble the output from the groups' outputs: ``(group, first column, width)``
        runs, in output order, with neighbouring columns of one group merged."""
        dims = self.embedding_dims()
        where = {}
        for g, group in enumerate(self.groups):
            column = 0
            for i in group.features:
                where[i] = (g, column)
                column += dims[i]
        runs: List[Tuple[int, int, int]] = []
        for i in range(len(self.features)):
            g, column = where[i]
            if runs and runs[-1][0] == g and runs[-1][1] + runs[-1][2] == column:
                runs[-1] = (g, runs[-1][1], runs[-1][2] + dims[i])
            else:
                runs.append((g, column, dims[i]))
        return runs
