"""Writing a plan by hand, with TorchRec's helpers::

    plan = construct_module_sharding_plan(ebc, {
        "t_user": table_wise(rank=1),
        "t_item": row_wise(),
        "t_ctx": column_wise(ranks=[0, 1]),
        "t_geo": table_row_wise(host_index=0),
        "t_tiny": data_parallel(),
    }, world_size=4, local_size=2)

Each helper returns a generator that, given a table's ``[rows, dim]`` and the world, lays out
its shards. The rules (also the planner's):

* row blocks are ``ceil(rows / n)`` rows over ``n`` ranks, the last ones shorter or empty;
* column blocks are ``ceil(dim / n)`` columns, the last one shorter, so odd dims shard too.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
from jaggedrec.distributed.embedding_types import EmbeddingComputeKernel
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder
from jaggedrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
from jaggedrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
from jaggedrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from jaggedrec.distributed.types import (EmbeddingModuleShardingPlan, EnumerableShardingSpec, ModuleSharder,
                                         ParameterSharding, ShardingType, ShardMetadata)

#: (rows, dim, local_size, world_size, device_type) -> ParameterSharding
ParameterShardingGenerator = Callable[[int, int, int, int, str], ParameterSharding]


def get_default_sharders() -> List[ModuleSharder]:
    """One sharder per collection type jaggedrec can shard, without fused parameters, in
    TorchRec's order; jaggedrec's HashEmbeddingBagCollection's first (an EmbeddingBagCollection
    itself, it would otherwise be taken by the bag collection's sharder)."""
    return [HashEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder(),
            FeatureProcessedEmbeddingBagCollectionSharder(),
            EmbeddingCollectionSharder(), ManagedCollisionEmbeddingBagCollectionSharder(),
            ManagedCollisionEmbeddingCollectionSharder()]


def block_sizes(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` blocks of ``ceil(total / parts)``, the tail shorter or 0."""
    block = -(-total // parts)
    full = total // block if block else 0
    return [block] * full + [total - full * block] * (full < parts) + [0] * max(0, parts - full - 1)


def _placement(rank: int, device_type: str) -> str:
    return f"rank:{rank}/{device_type}"


def _row_shards(rows: int, dim: int, ranks: Sequence[int], device_type: str) -> List[ShardMetadata]:
    sizes = block_sizes(rows, len(ranks))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [ShardMetadata([s, 0], [n, dim], _placement(r, device_type)) for r, s, n in zip(ranks, starts, sizes)]


def _check_rank(rank: int, world_size: int, what: str) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"{what}: rank {rank} is outside the world of {world_size} ranks")


def table_wise(rank: int, compute_kernel: Optional[str] = None) -> ParameterShardingGenerator:
    """The whole table on ``rank``."""
    def generate(rows, dim, local_size, world_size, device_type):
        _check_rank(rank, world_size, "table_wise")
        return ParameterSharding(ShardingType.TABLE_WISE.value, compute_kernel or EmbeddingComputeKernel.DENSE.value,
                                 [rank], EnumerableShardingSpec([ShardMetadata([0, 0], [rows, dim],
                                                                               _placement(rank, device_type))]))
    return generate


def row_wise(compute_kernel: Optional[str] = None) -> ParameterShardingGenerator:
    """Row blocks of ``ceil(rows / world_size)`` on ranks 0..W-1 (a rank may get none)."""
    def generate(rows, dim, local_size, world_size, device_type):
        ranks = list(range(world_size))
        return ParameterSharding(ShardingType.ROW_WISE.value, compute_kernel or EmbeddingComputeKernel.DENSE.value,
                                 ranks, EnumerableShardingSpec(_row_shards(rows, dim, ranks, device_type)))
    return generate


def column_wise(ranks: Sequence[int], compute_kernel: Optional[str] = None) -> ParameterShardingGenerator:
    """Column blocks of ``ceil(dim / len(ranks))``, block ``i`` on ``ranks[i]`` (a rank may
    hold several)."""
    ranks = list(ranks)

    def generate(rows, dim, local_size, world_size, device_type):
        if not ranks:
            raise ValueError("column_wise needs at least one rank")
        if len(ranks) > dim:
            raise ValueError(f"column_wise: {len(ranks)} column blocks for a table of dim {dim}")
        for r in ranks:
            _check_rank(r, world_size, "column_wise")
        sizes = block_sizes(dim, len(ranks))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        shards = [ShardMetadata([0, c], [rows, n], _placement(r, device_type)) for r, c, n in zip(ranks, starts, sizes)]
        return ParameterSharding(ShardingType.COLUMN_WISE.value, compute_kernel or EmbeddingComputeKernel.DENSE.value,
                                 list(ranks), EnumerableShardingSpec(shards))
    return generate


def table_row_wise(host_index: int, compute_kernel: Optional[str] = None) -> ParameterShardingGenerator:
    """Row blocks over the ``local_size`` ranks of host ``host_index``."""
    def generate(rows, dim, local_size, world_size, device_type):
        if local_size <= 0 or world_size % local_size:
            raise ValueError(f"table_row_wise: local_size {local_size} does not divide world_size {world_size}")
        if not 0 <= host_index < world_size // local_size:
            raise ValueError(f"table_row_wise: host {host_index} is outside the {world_size // local_size} hosts")
        ranks = list(range(host_index * local_size, (host_index + 1) * local_size))
        return ParameterSharding(ShardingType.TABLE_ROW_WISE.value,
                                 compute_kernel or EmbeddingComputeKernel.DENSE.value, ranks,
                                 EnumerableShardingSpec(_row_shards(rows, dim, ranks, device_type)))
    return generate


def data_parallel(compute_kernel: Optional[str] = None) -> ParameterShardingGenerator:
    """A full copy on every rank."""
    def generate(rows, dim, local_size, world_size, device_type):
        return ParameterSharding(ShardingType.DATA_PARALLEL.value,
                                 compute_kernel or EmbeddingComputeKernel.DENSE.value, list(range(world_size)), None)
    return generate


def table_shapes(module: nn.Module) -> Dict[str, tuple]:
    """Table name -> ``(rows, dim)`` of a bag or sequence collection."""
    configs = (module.embedding_bag_configs() if hasattr(module, "embedding_bag_configs")
               else module.embedding_configs())
    return {c.name: (c.num_embeddings, c.embedding_dim) for c in configs}


def construct_module_sharding_plan(module: nn.Module, per_param_sharding: Dict[str, ParameterShardingGenerator],
                                   sharder=None, local_size: Optional[int] = None, world_size: Optional[int] = None,
                                   device_type: Optional[str] = None) -> EmbeddingModuleShardingPlan:
    """The plan of one collection, one generator per table (every table needs one).

    ``world_size`` defaults to the default process group's; ``local_size`` (ranks per host)
    to ``world_size``; ``device_type`` to "cpu".
    """
    if world_size is None:
        import torch.distributed as dist
        if not dist.is_initialized():
            raise ValueError("construct_module_sharding_plan: give world_size, or initialise a process group")
        world_size = dist.get_world_size()
    local_size = local_size if local_size is not None else world_size
    device_type = device_type or "cpu"
    shapes = table_shapes(module)
    unknown = sorted(set(per_param_sharding) - set(shapes))
    if unknown:
        raise ValueError(f"construct_module_sharding_plan: no tables named {unknown}; the module has {sorted(shapes)}")
    missing = [name for name in shapes if name not in per_param_sharding]
    if missing:
        raise ValueError(f"construct_module_sharding_plan: no sharding given for tables {missing}")
    plan = EmbeddingModuleShardingPlan()
    for name, (rows, dim) in shapes.items():
        plan[name] = per_param_sharding[name](rows, dim, local_size, world_size, device_type)
    return plan
