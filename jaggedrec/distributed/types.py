"""The vocabulary of sharding, with TorchRec's names: sharding types, where each shard of a
table lives (``ParameterSharding``), per-module and whole-model plans, the process group a
module is sharded over (``ShardingEnv``), the awaitables a sharded forward returns, and the
two roles a program plugs in: ``ModuleSharder`` (makes a sharded module) and
``ShardingPlanner`` (writes a plan). ``ShardedTensor`` is torch's, which the sharded modules'
``state_dict`` holds.

A plan is plain data: the planner writes it, ``print(plan)`` shows it, and the sharders read
it. Nothing here talks to a process group except ``ShardingEnv.from_process_group``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import Enum, unique
from typing import Any, Dict, Generic, Iterator, List, Optional, Type, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from jaggedrec.distributed.embedding_types import EmbeddingComputeKernel


@unique
class ShardingType(Enum):
    """How one table is split over ranks (``ParameterSharding.sharding_type`` holds the value)."""

    DATA_PARALLEL = "data_parallel"    # replicated on every rank, gradients averaged
    TABLE_WISE = "table_wise"          # the whole table on one rank
    COLUMN_WISE = "column_wise"        # column blocks on one or more ranks
    ROW_WISE = "row_wise"              # row blocks of ceil(rows / W) on every rank
    TABLE_ROW_WISE = "table_row_wise"  # row blocks over the ranks of one host


@dataclass
class ShardMetadata:
    """One shard of a ``[rows, dim]`` table: ``[row offset, column offset]``, ``[rows, cols]``
    and ``placement`` ("rank:<r>/<device type>")."""

    shard_offsets: List[int]
    shard_sizes: List[int]
    placement: str

    @property
    def rank(self) -> int:
        return int(self.placement.split("/")[0].split(":")[1])


@dataclass
class EnumerableShardingSpec:
    """The shards of one table, in order (row blocks by row, column blocks by column)."""

    shards: List[ShardMetadata]


@dataclass
class ParameterSharding:
    """Where one table lives.

    ``ranks`` lists the shards' ranks in shard order (every rank for DATA_PARALLEL);
    ``sharding_spec`` gives each shard's offsets and sizes (None for DATA_PARALLEL).
    """

    sharding_type: str
    compute_kernel: str = EmbeddingComputeKernel.DENSE.value
    ranks: Optional[List[int]] = None
    sharding_spec: Optional[EnumerableShardingSpec] = None

    def __post_init__(self) -> None:
        if isinstance(self.sharding_type, ShardingType):
            self.sharding_type = self.sharding_type.value
        if isinstance(self.compute_kernel, EmbeddingComputeKernel):
            self.compute_kernel = self.compute_kernel.value
        known = {t.value for t in ShardingType}
        if self.sharding_type not in known:
            raise ValueError(f"sharding_type must be one of {sorted(known)}, got {self.sharding_type!r}")

    @property
    def shards(self) -> List[ShardMetadata]:
        return list(self.sharding_spec.shards) if self.sharding_spec is not None else []


class EmbeddingModuleShardingPlan(Dict[str, ParameterSharding]):
    """One module's plan: table name -> ``ParameterSharding``."""

    def __str__(self) -> str:
        return _format_module_plan(self)


@dataclass
class ShardingPlan:
    """A model's plan: module path ("" for the model itself) -> that module's plan."""

    plan: Dict[str, EmbeddingModuleShardingPlan] = field(default_factory=dict)

    def get_plan_for_module(self, module_path: str) -> Optional[EmbeddingModuleShardingPlan]:
        return self.plan.get(module_path)

    def __str__(self) -> str:
        parts = []
        for path, module_plan in self.plan.items():
            parts.append(f"module: {path or '<model>'}\n{_format_module_plan(module_plan)}")
        return "\n\n".join(parts) if parts else "ShardingPlan(empty)"


def _format_module_plan(module_plan: Dict[str, ParameterSharding]) -> str:
    """Two tables, as TorchRec prints a plan: one row per table (type, kernel, ranks), then
    one row per shard (offsets, sizes, placement)."""
    head = ("table", "sharding type", "compute kernel", "ranks")
    rows = [head] + [(name, p.sharding_type, p.compute_kernel, str(p.ranks)) for name, p in module_plan.items()]
    lines = _columns(rows)
    shard_rows = [("table", "shard offsets", "shard sizes", "placement")]
    for name, p in module_plan.items():
        for s in p.shards:
            shard_rows.append((name, str(s.shard_offsets), str(s.shard_sizes), s.placement))
    if len(shard_rows) > 1:
        lines += [""] + _columns(shard_rows)
    return "\n".join(lines)


def _columns(rows: List[tuple]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return out


@dataclass
class ShardingEnv:
    """The ranks a module is sharded over: ``world_size``, this process's ``rank`` and the
    process group (None for planning or sharding without communication)."""

    world_size: int
    rank: int
    process_group: Optional[dist.ProcessGroup] = None

    @staticmethod
    def from_process_group(pg: dist.ProcessGroup) -> "ShardingEnv":
        return ShardingEnv(dist.get_world_size(pg), dist.get_rank(pg), pg)

    @staticmethod
    def from_local(world_size: int, rank: int) -> "ShardingEnv":
        return ShardingEnv(world_size, rank, None)


# --- awaitables ------------------------------------------------------------------------------

W = TypeVar("W")


class Awaitable(abc.ABC, Generic[W]):
    """A result that collectives still have to deliver: ``wait()`` blocks until it has, once."""

    def __init__(self) -> None:
        self._result: Any = None
        self._done = False

    @abc.abstractmethod
    def _wait_impl(self) -> W:
        ...

    def wait(self) -> W:
        if not self._done:
            self._result = self._wait_impl()
            self._done = True
        return self._result


class NoWait(Awaitable[W]):
    """An ``Awaitable`` of a value that is already there."""

    def __init__(self, obj: W) -> None:
        super().__init__()
        self._obj = obj

    def _wait_impl(self) -> W:
        return self._obj


class LazyAwaitable(Awaitable[W]):
    """An ``Awaitable`` that waits by itself when used: attribute access, indexing, iteration
    and torch functions all see the waited result, so a model can treat a sharded module's
    output as the ``KeyedTensor`` it will be."""

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_result", "_done"):
            raise AttributeError(name)
        return getattr(self.wait(), name)

    def __getitem__(self, key):
        return self.wait()[key]

    def __iter__(self) -> Iterator:
        return iter(self.wait())

    def __len__(self) -> int:
        return len(self.wait())

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_waited(args), **_waited(kwargs or {}))


def _waited(obj):
    """``obj`` with every ``LazyAwaitable`` inside (lists, tuples, dicts) replaced by its result."""
    if isinstance(obj, LazyAwaitable):
        return obj.wait()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_waited(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _waited(v) for k, v in obj.items()}
    return obj


# --- the roles a program plugs in ------------------------------------------------------------

M = TypeVar("M", bound=nn.Module)


class ModuleSharder(abc.ABC, Generic[M]):
    """Makes the sharded form of modules of ``module_type``, by one module plan.

    jaggedrec's sharders (``EmbeddingBagCollectionSharder``, ``EmbeddingCollectionSharder``)
    derive from it; a program may list them as ``List[ModuleSharder[nn.Module]]``.

    Args:
        qcomm_codecs_registry: TorchRec's quantized-collective codecs. jaggedrec's collectives
            send fp32 (rows) and int64 (ids) as they are, so only None (or empty) is taken.
    """

    def __init__(self, qcomm_codecs_registry: Optional[Dict[str, Any]] = None) -> None:
        if qcomm_codecs_registry:
            raise ValueError(f"{type(self).__name__}: qcomm_codecs_registry {sorted(qcomm_codecs_registry)} asks "
                             f"for quantized collectives, which jaggedrec does not have; pass None")

    @abc.abstractmethod
    def shard(self, module: M, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        """The sharded module: this rank's shards of ``module`` by ``params`` (table name ->
        ``ParameterSharding``), on ``device``."""

    @property
    @abc.abstractmethod
    def module_type(self) -> Type[M]:
        """The module class this sharder shards (subclasses included)."""

    @property
    def qcomm_codecs_registry(self) -> Optional[Dict[str, Any]]:
        return None

    def shardable_parameters(self, module: M) -> Dict[str, nn.Parameter]:
        """What the plan places, by the name the plan uses for it."""
        return dict(module.named_parameters())

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """The ``ShardingType`` values this sharder can lay out."""
        return [t.value for t in ShardingType]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        """The ``EmbeddingComputeKernel`` values this sharder can run for ``sharding_type``."""
        return [EmbeddingComputeKernel.DENSE.value]


class ShardingPlanner(abc.ABC):
    """Writes a ``ShardingPlan`` for a model: ``plan`` alone, ``collective_plan`` on one rank
    for all (every rank then shards by the same plan)."""

    @abc.abstractmethod
    def plan(self, module: nn.Module, sharders: List[ModuleSharder]) -> ShardingPlan:
        ...

    @abc.abstractmethod
    def collective_plan(self, module: nn.Module, sharders: List[ModuleSharder],
                        pg: Optional[dist.ProcessGroup] = None) -> ShardingPlan:
        ...


def device_type_of(device: Optional[torch.device]) -> str:
    return torch.device(device).type if device is not None else "cpu"
