"""Table configurations, with TorchRec's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum, unique
from typing import Callable, List, Optional

import torch


@unique
class PoolingType(Enum):
    """How the rows of one bag are reduced to one vector."""

    SUM = "SUM"
    MEAN = "MEAN"


@unique
class DataType(Enum):
    """Storage type of a table's rows. Pooled outputs are always fp32. INT8 and INT4 are
    row-wise quantized (a scale and a bias per row) and serve only ``jaggedrec.quant``'s
    inference module."""

    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"
    INT8 = "INT8"
    INT4 = "INT4"

    @property
    def is_quantized(self) -> bool:
        return self in (DataType.INT8, DataType.INT4)

    def to_torch(self) -> torch.dtype:
        if self.is_quantized:
            raise ValueError(f"DataType.{self.value} tables are row-wise quantized, for inference: train the table "
                             f"in FP32, FP16 or BF16, then convert the module with "
                             f"jaggedrec.quant.EmbeddingBagCollection.from_float")
        return _TORCH_DTYPES[self]

    def __str__(self) -> str:
        return self.value


_TORCH_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


class ConfigError(ValueError, AssertionError):
    """Arguments a module refuses. Also an ``AssertionError``: TorchRec asserts on the same
    arguments, and code written for it (its own tests among them) catches that."""


@dataclass
class BaseEmbeddingConfig:
    """Fields shared by pooled and unpooled tables.

    ``weight_init_min``/``weight_init_max`` default to -/+ sqrt(1 / num_embeddings),
    and an empty ``feature_names`` means the table serves one feature named like it.
    ``init_fn``, when given, is called on the table's ``[num_embeddings, embedding_dim]``
    weight view and replaces the uniform init.

    The fields are TorchRec's, in its order. ``need_pos``, ``input_dim`` and
    ``total_num_buckets`` are kept for code that reads them; the features jaggedrec does not
    have (pruned tables, virtual tables, embedding updates, stashed weights) are refused when
    set, with ``NotImplementedError``.
    """

    num_embeddings: int
    embedding_dim: int
    name: str = ""
    data_type: DataType = DataType.FP32
    feature_names: List[str] = field(default_factory=list)
    weight_init_max: Optional[float] = None
    weight_init_min: Optional[float] = None
    num_embeddings_post_pruning: Optional[int] = None
    init_fn: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
    need_pos: bool = False  # the table's features are position weighted (TorchRec's RW sharding reads it)
    input_dim: Optional[int] = None
    total_num_buckets: Optional[int] = None
    use_virtual_table: bool = False
    virtual_table_eviction_policy: Optional[object] = None
    enable_embedding_update: bool = False
    stash_weights: bool = False

    def __post_init__(self) -> None:
        label = f"table '{self.name}'"
        if not self.name:
            raise ValueError("an embedding table config needs a non-empty name")
        for attr in ("num_embeddings", "embedding_dim"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{label}: {attr} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{label}: {attr} must be positive, got {value}")
        if not isinstance(self.data_type, DataType):
            raise TypeError(f"{label}: data_type must be a DataType, got {self.data_type!r}")
        unsupported = {"num_embeddings_post_pruning": self.num_embeddings_post_pruning is not None,
                       "use_virtual_table": self.use_virtual_table,
                       "virtual_table_eviction_policy": self.virtual_table_eviction_policy is not None,
                       "enable_embedding_update": self.enable_embedding_update, "stash_weights": self.stash_weights}
        named = [k for k, on in unsupported.items() if on]
        if named:
            raise NotImplementedError(f"{label}: {', '.join(named)} (pruned or virtual tables, embedding updates, "
                                      "stashed weights) are not implemented in jaggedrec")
        self.feature_names = list(self.feature_names) or [self.name]
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"{label}: feature_names has duplicates: {self.feature_names}")
        bound = math.sqrt(1.0 / self.num_embeddings)
        if self.weight_init_max is None:
            self.weight_init_max = bound
        if self.weight_init_min is None:
            self.weight_init_min = -bound

    def num_features(self) -> int:
        return len(self.feature_names)

    def get_weight_init_max(self) -> float:
        return self.weight_init_max

    def get_weight_init_min(self) -> float:
        return self.weight_init_min


@dataclass
class EmbeddingBagConfig(BaseEmbeddingConfig):
    """A table whose rows are pooled per bag (SUM or MEAN)."""

    pooling: PoolingType = PoolingType.SUM

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pooling, PoolingType):
            raise TypeError(f"table '{self.name}': pooling must be a PoolingType, got {self.pooling!r}")


@dataclass
class EmbeddingConfig(BaseEmbeddingConfig):
    """A table whose rows are returned per id, without pooling."""
