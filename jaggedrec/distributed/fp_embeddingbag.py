"""``FeatureProcessedEmbeddingBagCollectionSharder`` and the
``ShardedFeatureProcessedEmbeddingBagCollection`` it makes, at TorchRec's path.

The feature processors stay whole on every rank and run on the rank that holds the batch,
before the input dist: their parameters are dense (``DistributedModelParallel`` leaves them to
``DistributedDataParallel`` and the dense optimizer). The inner ``EmbeddingBagCollection`` is
sharded by an ``EmbeddingBagCollectionSharder`` as it would be alone; the per-id weights the
processors give travel with the ids, and when the processors train, their gradient comes back
through the input dist (``ShardedEmbeddingBagCollection.set_weights_require_grad``).

Why per-id weights travel, not what it takes to read position weights on the owning rank: a
row-wise shard gets each bag cut by id range (``InputDist._bucketize``), so the ids it holds
no longer sit at their positions in the input bag, and it would need each id's position, an
``[N]`` tensor as large as the weights. Only whole-bag shards (table-, column-wise, data
parallel) keep positions; reading the position weights there would save the weights' all-to-all
both ways but would need the sharded collection's lookups to take position weights, and the
position weights' gradient to come from every owning rank.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection, process_features
from jaggedrec.optim import FusedOptimizer
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.shards import CollectionSharder
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ShardingEnv

_OWNER = "ShardedFeatureProcessedEmbeddingBagCollection"
# the submodule names are TorchRec's state_dict contract (and the unsharded module's)
_EBC, _PROCESSORS = "_embedding_bag_collection", "_feature_processors"


class ShardedFeatureProcessedEmbeddingBagCollection(nn.Module):
    """A ``FeatureProcessedEmbeddingBagCollection`` sharded over the ranks of ``env``.

    ``forward(kjt)`` takes this rank's KJT (``B`` bags per feature, the same ``B`` on every
    rank) and returns the sharded collection's awaitable of the ``[B, sum(dims)]``
    KeyedTensor the unsharded module gives. ``state_dict`` keys are the unsharded module's:
    ``_embedding_bag_collection.embedding_bags.<table>.weight`` (this rank's shards, as the
    sharded collection writes them) and ``_feature_processors...`` (whole).
    """

    def __init__(self, module: FeatureProcessedEmbeddingBagCollection, table_name_to_parameter_sharding:
                 EmbeddingModuleShardingPlan, ebc_sharder: EmbeddingBagCollectionSharder, env: ShardingEnv,
                 device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> None:
        super().__init__()
        processors = module.get_submodule(_PROCESSORS)
        ebc = module.get_submodule(_EBC)
        self._embedding_bag_collection = ebc_sharder.shard(ebc, table_name_to_parameter_sharding, env, device,
                                                           f"{module_fqn}.{_EBC}" if module_fqn else _EBC)
        self._feature_processors = processors
        if device is not None:
            self._feature_processors.to(device)
        self._plan = table_name_to_parameter_sharding

    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._embedding_bag_collection.fused_optimizer

    def embedding_bag_configs(self):
        return self._embedding_bag_collection.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return True

    def processors_train(self) -> bool:
        """Whether the processors' parameters take gradients: from the module's settings, alike
        on every rank, so every rank runs the weights' way back (or none does)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._feature_processors.parameters())

    def forward(self, features: KeyedJaggedTensor):
        """
        Args:
            features: this rank's KJT (``B`` bags per key), jaggedrec's or TorchRec's.
        Returns:
            the sharded collection's awaitable of ``[B, sum(dims)]`` KeyedTensor.
        """
        weighted = process_features(self._feature_processors, features, _OWNER)
        self._embedding_bag_collection.set_weights_require_grad(self.processors_train())
        return self._embedding_bag_collection(weighted)


class FeatureProcessedEmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``FeatureProcessedEmbeddingBagCollection``s: the inner collection by
    ``ebc_sharder`` (default: an ``EmbeddingBagCollectionSharder`` with ``fused_params``),
    the processors kept whole."""

    module_type = FeatureProcessedEmbeddingBagCollection
    sharded_type = ShardedFeatureProcessedEmbeddingBagCollection

    def __init__(self, ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
                 qcomm_codecs_registry: Optional[dict] = None, fused_params: Optional[dict] = None) -> None:
        self._ebc_sharder = ebc_sharder or EmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry)
        super().__init__(self._ebc_sharder.fused_params, qcomm_codecs_registry)

    def shard(self, module: nn.Module, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        if not isinstance(module, FeatureProcessedEmbeddingBagCollection):
            raise TypeError(f"{type(self).__name__} shards jaggedrec.FeatureProcessedEmbeddingBagCollection, got "
                            f"{type(module).__name__}")
        return ShardedFeatureProcessedEmbeddingBagCollection(module, params, self._ebc_sharder, env, device,
                                                             module_fqn)

    def shard_optimizer(self, module: nn.Module) -> Optional[FusedOptimizer]:
        return self._ebc_sharder.shard_optimizer(module.get_submodule(_EBC))

    def shardable_parameters(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        return self._ebc_sharder.shardable_parameters(module.get_submodule(_EBC))

    def compute_kernels(self, sharding_type: str, compute_device_type: str):
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._ebc_sharder.fused_optimizer
