"""Where every table and feature of a collection lives in flat storage.

Tables of one dtype share one flat ``[W]`` tensor, so that one launch can reach every
table. Within it, tables are ordered by embedding dim, so that all tables of one dim form
one contiguous ``[rows, dim]`` block (the torch path serves a whole block with one call),
and each block starts on a 32-element boundary for aligned vector loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig, PoolingType
from jaggedrec.ops.feature_tables import FeatureTables

_BLOCK_ALIGN = 32
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class TableSlot:
    name: str
    rows: int
    dim: int
    group: int   # index of the storage group (one per dtype)
    offset: int  # element offset in the group's flat tensor


@dataclass(frozen=True)
class FeatureSlot:
    feature: str         # KJT key it reads
    embedding_name: str  # output key: the feature name, or "feature@table" when shared
    table: int
    pooling: int         # 0 SUM, 1 MEAN


@dataclass(frozen=True)
class StorageGroup:
    """One flat tensor and the features it serves, in output order."""

    name: str  # "fp32", "fp16", "bf16": the parameter's name
    dtype: torch.dtype
    numel: int
    features: Tuple[int, ...]
    # Per feature, in the op's argument form:
    key_names: Tuple[str, ...]  # the KJT key it reads
    weight_offsets: Tuple[int, ...]
    rows: Tuple[int, ...]
    dims: Tuple[int, ...]
    pooling: Tuple[int, ...]

    def feature_tables(self, keys: Sequence[int], num_keys: int) -> List[int]:
        """The ops' ``tables`` argument for a KJT of ``num_keys`` keys in which feature ``i``
        of this group reads key ``keys[i]`` (see ``ops/feature_tables.py``)."""
        return FeatureTables(self.weight_offsets, self.rows, self.dims, tuple(keys), self.pooling,
                             num_keys).encode()


class TableLayout:
    """Flat-storage plan for a list of table configs (``EmbeddingBagConfig`` or ``EmbeddingConfig``).

    Attributes:
        tables: one slot per config, in config order.
        features: one slot per output feature, in output order (table order, then each
            table's ``feature_names``), which is TorchRec's KeyedTensor order.
        groups: one per dtype, in order of first appearance.
    """

    def __init__(self, configs: Sequence[BaseEmbeddingConfig]) -> None:
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate table names: {duplicates}")
        if not configs:
            raise ValueError("an embedding collection needs at least one table")
        self.configs = list(configs)

        dtypes: List[torch.dtype] = []
        for c in configs:
            if c.data_type.to_torch() not in dtypes:
                dtypes.append(c.data_type.to_torch())
        offsets: Dict[int, Tuple[int, int]] = {}
        sizes = []
        for g, dtype in enumerate(dtypes):
            members = [i for i, c in enumerate(configs) if c.data_type.to_torch() == dtype]
            cursor, last_dim = 0, None
            for i in sorted(members, key=lambda i: configs[i].embedding_dim):
                if configs[i].embedding_dim != last_dim:
                    cursor = -(-cursor // _BLOCK_ALIGN) * _BLOCK_ALIGN
                    last_dim = configs[i].embedding_dim
                offsets[i] = (g, cursor)
                cursor += configs[i].num_embeddings * configs[i].embedding_dim
            sizes.append(cursor)
        self.tables = [TableSlot(c.name, c.num_embeddings, c.embedding_dim, *offsets[i])
                       for i, c in enumerate(configs)]

        uses: Dict[str, int] = {}
        for c in configs:
            for f in c.feature_names:
                uses[f] = uses.get(f, 0) + 1
        self.features = [
            FeatureSlot(f, f"{f}@{c.name}" if uses[f] > 1 else f, t,
                        int(getattr(c, "pooling", None) == PoolingType.MEAN))
            for t, c in enumerate(configs) for f in c.feature_names]

        self.groups = []
        for g, dtype in enumerate(dtypes):
            fs = tuple(i for i, s in enumerate(self.features) if self.tables[s.table].group == g)
            tabs = [self.tables[self.features[i].table] for i in fs]
            self.groups.append(StorageGroup(
                _DTYPE_NAMES[dtype], dtype, sizes[g], fs, tuple(self.features[i].feature for i in fs),
                tuple(t.offset for t in tabs),
                tuple(t.rows for t in tabs), tuple(t.dim for t in tabs),
                tuple(self.features[i].pooling for i in fs)))

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
