"""``ManagedCollisionEmbeddingCollectionSharder`` and the
``ShardedManagedCollisionEmbeddingCollection`` it makes, at TorchRec's path: the unpooled
collection behind managed-collision modules, sharded as the bag one is (``mc_embeddingbag.py``).
"""

from __future__ import annotations

from typing import Optional

from jaggedrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
from jaggedrec.distributed.mc_embeddingbag import (BaseManagedCollisionSharder,
                                                   BaseShardedManagedCollisionEmbeddingCollection)
from jaggedrec.distributed.mc_modules import ManagedCollisionCollectionSharder


class ShardedManagedCollisionEmbeddingCollection(BaseShardedManagedCollisionEmbeddingCollection):
    """A ``ManagedCollisionEmbeddingCollection`` sharded over the ranks of ``env``: the
    awaitable gives the ``Dict[feature, JaggedTensor]`` of ``[N_f, dim]`` rows."""

    def embedding_configs(self):
        return self._embedding_module.embedding_configs()


class ManagedCollisionEmbeddingCollectionSharder(BaseManagedCollisionSharder):
    """Shards ``ManagedCollisionEmbeddingCollection``s: the collection by ``ec_sharder``
    (default: an ``EmbeddingCollectionSharder`` with ``fused_params``), the managed-collision
    collection by ``mc_sharder``, one plan for both."""

    module_type = ManagedCollisionEmbeddingCollection
    sharded_type = ShardedManagedCollisionEmbeddingCollection
    _embedding_sharder_type = EmbeddingCollectionSharder

    def __init__(self, ec_sharder: Optional[EmbeddingCollectionSharder] = None,
                 mc_sharder: Optional[ManagedCollisionCollectionSharder] = None, fused_params: Optional[dict] = None,
                 qcomm_codecs_registry: Optional[dict] = None) -> None:
        super().__init__(ec_sharder, mc_sharder, fused_params, qcomm_codecs_registry)
