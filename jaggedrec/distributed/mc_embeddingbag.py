"""``ManagedCollisionEmbeddingBagCollectionSharder`` and the
``ShardedManagedCollisionEmbeddingBagCollection`` it makes, at TorchRec's path, with the base
both managed-collision collections share (``mc_embedding.py`` has the unpooled one).

The managed-collision collection is sharded by the plan of its tables
(``mc_modules.ShardedManagedCollisionCollection``: each bucket's id map on the rank that holds
the bucket's first row) and the embedding collection by its own sharder, as it would be alone,
so the two can sit beside static tables in one model and one plan. A step remaps the raw ids on
their buckets' owners and sends the rows back to the source rank, whose sharded collection then
looks them up (its input dist, lookup and output dist, fused optimizer and checkpoint as
always). ``state_dict`` keys are the unsharded module's.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from jaggedrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from jaggedrec.optim import FusedOptimizer
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, as_keyed_jagged_tensor
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.mc_modules import ManagedCollisionCollectionSharder, ShardedManagedCollisionCollection
from jaggedrec.distributed.shards import CollectionSharder
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ShardingEnv

# the submodule names are TorchRec's state_dict contract (and the unsharded module's)
_EMBEDDINGS, _MCC = "_embedding_module", "_managed_collision_collection"


class BaseShardedManagedCollisionEmbeddingCollection(nn.Module):
    """A managed-collision collection sharded over the ranks of ``env``: ``forward(kjt)`` returns
    (the sharded embedding collection's awaitable, the remapped KJT when the module returns it,
    else None), as the unsharded module returns (output, remapped KJT or None)."""

    def __init__(self, module: nn.Module, plan: EmbeddingModuleShardingPlan, embedding_sharder: CollectionSharder,
                 mc_sharder: ManagedCollisionCollectionSharder, env: ShardingEnv,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self._managed_collision_collection: ShardedManagedCollisionCollection = mc_sharder.shard(
            module.get_submodule(_MCC), plan, env, device)
        self._embedding_module = embedding_sharder.shard(module.get_submodule(_EMBEDDINGS), plan, env, device)
        self._return_remapped_features = module.return_remapped_features
        self._plan = plan

    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def managed_collision_collection(self) -> ShardedManagedCollisionCollection:
        return self._managed_collision_collection

    @property
    def embedding_module(self) -> nn.Module:
        return self._embedding_module

    def forward(self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True
                ) -> Tuple[object, Optional[KeyedJaggedTensor]]:
        """
        Args:
            features: this rank's KJT (``B`` bags per key, the same ``B`` on every rank).
        Returns:
            (the sharded collection's awaitable of what the unsharded collection gives for these
            bags, the remapped KJT or None).
        """
        remapped = self._managed_collision_collection(as_keyed_jagged_tensor(features), mutate_miss_lengths)
        out = self._embedding_module(remapped)
        # the evicted rows keep their values, as the unsharded module leaves them (TorchRec 1.8)
        self._managed_collision_collection.evict()
        return out, (remapped if self._return_remapped_features else None)


class ShardedManagedCollisionEmbeddingBagCollection(BaseShardedManagedCollisionEmbeddingCollection):
    """A ``ManagedCollisionEmbeddingBagCollection`` sharded over the ranks of ``env``: the
    awaitable gives the ``[B, sum(dims)]`` KeyedTensor."""

    def embedding_bag_configs(self):
        return self._embedding_module.embedding_bag_configs()


class BaseManagedCollisionSharder(CollectionSharder):
    """What both managed-collision sharders share: the embedding collection's sharder decides
    the fused optimizer, kernels and parameters; the managed-collision collection follows its plan."""

    _embedding_sharder_type: type = EmbeddingBagCollectionSharder

    def __init__(self, embedding_sharder: Optional[CollectionSharder] = None,
                 mc_sharder: Optional[ManagedCollisionCollectionSharder] = None, fused_params: Optional[dict] = None,
                 qcomm_codecs_registry: Optional[dict] = None) -> None:
        self._embedding_sharder = embedding_sharder or self._embedding_sharder_type(fused_params, qcomm_codecs_registry)
        self._mc_sharder = mc_sharder or ManagedCollisionCollectionSharder(qcomm_codecs_registry)
        super().__init__(self._embedding_sharder.fused_params, qcomm_codecs_registry)

    def shard(self, module: nn.Module, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        if not isinstance(module, self.module_type):
            raise TypeError(f"{type(self).__name__} shards jaggedrec.{self.module_type.__name__}, got "
                            f"{type(module).__name__}")
        return self.sharded_type(module, params, self._embedding_sharder, self._mc_sharder, env, device)

    def shard_optimizer(self, module: nn.Module) -> Optional[FusedOptimizer]:
        return self._embedding_sharder.shard_optimizer(module.get_submodule(_EMBEDDINGS))

    def shardable_parameters(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        return self._embedding_sharder.shardable_parameters(module.get_submodule(_EMBEDDINGS))

    def compute_kernels(self, sharding_type: str, compute_device_type: str):
        return self._embedding_sharder.compute_kernels(sharding_type, compute_device_type)

    def sharding_types(self, compute_device_type: str):
        return self._mc_sharder.sharding_types(compute_device_type)

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._embedding_sharder.fused_optimizer


class ManagedCollisionEmbeddingBagCollectionSharder(BaseManagedCollisionSharder):
    """Shards ``ManagedCollisionEmbeddingBagCollection``s: the bag collection by ``ebc_sharder``
    (default: an ``EmbeddingBagCollectionSharder`` with ``fused_params``), the managed-collision
    collection by ``mc_sharder``, one plan for both."""

    module_type = ManagedCollisionEmbeddingBagCollection
    sharded_type = ShardedManagedCollisionEmbeddingBagCollection
    _embedding_sharder_type = EmbeddingBagCollectionSharder

    def __init__(self, ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
                 mc_sharder: Optional[ManagedCollisionCollectionSharder] = None, fused_params: Optional[dict] = None,
                 qcomm_codecs_registry: Optional[dict] = None) -> None:
        super().__init__(ebc_sharder, mc_sharder, fused_params, qcomm_codecs_registry)
