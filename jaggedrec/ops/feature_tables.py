"""``FeatureTables``: what an op knows of the tables it reads, as one static ``int[]`` argument.

Every op (pooled or sequence, forward, backward or fused step) serves the features of one
flat weight tensor. It knows a feature only by integers: where its table starts in the flat
tensor, the table's rows and dim, which of the KJT's ``K`` keys it reads, and how it pools.
Those facts travel between the modules and the ops as one ``int[]``
(:meth:`FeatureTables.encode`), so that torch.compile bakes them into the graph as
constants and every op signature names them once; the ops turn it back with
:func:`feature_tables`, which is cached, as are the plans derived from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from jaggedrec.kernels.common import (META_DIM, META_FIELDS, META_KEY, META_MEAN, META_OUT_COLUMN, META_ROW_BASE,
                                      META_ROWS, META_WEIGHT_OFFSET)

from jaggedrec.ops.pooled_plan import PooledPlan, make_plan


@dataclass(frozen=True)
class FeatureTables:
    """The features one op call serves, all reading tables of one flat ``[W]`` weight tensor.

    Attributes (one entry per feature, in the op's output order):
        weight_offsets: element offset of the feature's table in the flat weights.
        rows: rows of the table.
        dims: embedding dim of the table.
        keys: index of the feature's key among the KJT's ``num_keys`` keys.
        pooling: 0 SUM, 1 MEAN (sequence ops ignore it).
        num_keys: K, the KJT's key count.
        storage: quantized ops only: each table's storage type (``STORAGE_INT8``,
            ``STORAGE_INT4``, ``STORAGE_FP16``); weight offsets are then byte offsets. Empty for
            float ops, whose tables have the flat tensor's dtype.
        row_bytes: quantized ops only: each table's row stride in bytes.
    """

    weight_offsets: Tuple[int, ...]
    rows: Tuple[int, ...]
    dims: Tuple[int, ...]
    keys: Tuple[int, ...]
    pooling: Tuple[int, ...]
    num_keys: int
    storage: Tuple[int, ...] = ()
    row_bytes: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = {len(self.weight_offsets), len(self.rows), len(self.dims), len(self.keys), len(self.pooling)}
        if self.storage or self.row_bytes:
            sizes |= {len(self.storage), len(self.row_bytes)}
        if len(sizes) != 1:
            raise ValueError(f"FeatureTables: per-feature fields of different lengths {sorted(sizes)}")
        if any(k < 0 or k >= self.num_keys for k in self.keys):
            raise ValueError(f"FeatureTables: keys {list(self.keys)} outside [0, {self.num_keys})")

    @property
    def num_features(self) -> int:
        return len(self.dims)

    def encode(self) -> List[int]:
        """``[F, K, weight_offsets, rows, dims, keys, pooling, storage?, row_bytes?]`` flattened:
        the ops' ``tables`` argument (the last two only for a quantized op)."""
        return [self.num_features, self.num_keys, *self.weight_offsets, *self.rows, *self.dims, *self.keys,
                *self.pooling, *self.storage, *self.row_bytes]

    # plain properties, not cached_property: Python 3.11's takes a lock, which torch.compile
    # cannot trace; the plan is cached by make_plan, the rest costs O(F)
    @property
    def plan(self) -> PooledPlan:
        """The features grouped by dim into passes (see ``pooled_plan.make_plan``)."""
        return make_plan(self.weight_offsets, self.rows, self.dims, self.keys, self.pooling, self.num_keys)

    @property
    def row_bases(self) -> Tuple[int, ...]:
        """Per feature, the first row of its table when the tables of the flat tensor are
        numbered row after row in storage order: the index into row-wise optimizer state."""
        first_row, total = {}, 0
        for offset, num_rows in sorted(set(zip(self.weight_offsets, self.rows))):
            first_row[offset] = total
            total += num_rows
        return tuple(first_row[o] for o in self.weight_offsets)

    @property
    def meta_rows(self) -> Tuple[Tuple[int, ...], ...]:
        """One row per feature in the kernels' ``META_FIELDS`` layout (see ``kernels/common.py``)."""
        fields = {META_WEIGHT_OFFSET: self.weight_offsets, META_DIM: self.dims, META_ROWS: self.rows,
                  META_OUT_COLUMN: self.plan.out_offsets[:-1], META_KEY: self.keys, META_MEAN: self.pooling,
                  META_ROW_BASE: self.row_bases}
        assert sorted(field.value for field in fields) == list(range(META_FIELDS.value))
        columns = [None] * META_FIELDS.value
        for field, column in fields.items():
            columns[field.value] = column
        return tuple(zip(*columns))

    def meta(self, like: torch.Tensor) -> torch.Tensor:
        """``[F, META_FIELDS]`` int64 on ``like``'s device. Eager calls reuse one cached copy, so
        the host-to-device copy (which would wait for the stream) happens once per layout."""
        if torch.compiler.is_compiling() or is_fake(like):
            return torch.tensor(self.meta_rows, dtype=torch.int64, device=like.device).view(-1, int(META_FIELDS))
        return _cached_meta(self.meta_rows, like.device)


@functools.lru_cache(maxsize=256)
def _cached_meta(meta_rows: Tuple[Tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(meta_rows, dtype=torch.int64, device=device).view(-1, int(META_FIELDS))


def feature_tables(encoded: Sequence[int]) -> FeatureTables:
    """The :class:`FeatureTables` that ``encoded`` (:meth:`FeatureTables.encode`) describes."""
    return _decode(tuple(encoded))


@functools.lru_cache(maxsize=256)
def _decode(encoded: Tuple[int, ...]) -> FeatureTables:
    n = encoded[0] if encoded else 0
    if len(encoded) < 2 or len(encoded) not in (2 + 5 * n, 2 + 7 * n):
        raise ValueError(f"not an encoded FeatureTables: {list(encoded)[:12]}")
    fields = [tuple(encoded[2 + i * n: 2 + (i + 1) * n]) for i in range((len(encoded) - 2) // n if n else 5)]
    return FeatureTables(*fields[:5], num_keys=encoded[1], storage=fields[5] if len(fields) > 5 else (),
                         row_bytes=fields[6] if len(fields) > 6 else ())


# storage types of a quantized op's tables (FeatureTables.storage)
STORAGE_INT8, STORAGE_INT4, STORAGE_FP16 = 1, 2, 3
