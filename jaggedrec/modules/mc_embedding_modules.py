"""Embedding collections behind managed-collision modules, with TorchRec's API
(``torchrec.modules.mc_embedding_modules``): the features are remapped by a
:class:`~jaggedrec.modules.mc_modules.ManagedCollisionCollection`, then looked up in a jaggedrec
``EmbeddingBagCollection`` / ``EmbeddingCollection``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from jaggedrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from jaggedrec.modules.mc_modules import ManagedCollisionCollection
from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = ["BaseManagedCollisionEmbeddingCollection", "ManagedCollisionEmbeddingBagCollection",
           "ManagedCollisionEmbeddingCollection", "evict", "return_custom_metadata",
           "return_remapped_lengths_as_mask"]


def evict(evictions: Dict[str, Optional[torch.Tensor]], ebc: nn.Module) -> None:
    """What to do with the rows of evicted ids: nothing, as in TorchRec 1.8 (the row keeps its
    trained values for the id that takes it)."""
    del evictions, ebc


class BaseManagedCollisionEmbeddingCollection(nn.Module):
    """``forward(features)`` -> (the embedding module's output, the remapped KJT when
    ``return_remapped_features`` else None)."""

    def __init__(self, embedding_module: Union[EmbeddingBagCollection, EmbeddingCollection],
                 managed_collision_collection: ManagedCollisionCollection, return_remapped_features: bool = False,
                 allow_in_place_embed_weight_update: bool = False) -> None:
        super().__init__()
        self._managed_collision_collection = managed_collision_collection
        self._return_remapped_features = return_remapped_features
        self._allow_in_place_embed_weight_update = allow_in_place_embed_weight_update
        self._embedding_module = embedding_module
        if isinstance(embedding_module, EmbeddingBagCollection):
            configs = embedding_module.embedding_bag_configs()
        else:
            configs = embedding_module.embedding_configs()
        if list(configs) != list(managed_collision_collection.embedding_configs()):
            raise ValueError("the embedding module and the ManagedCollisionCollection must hold the same table configs")

    @property
    def managed_collision_collection(self) -> ManagedCollisionCollection:
        return self._managed_collision_collection

    @property
    def return_remapped_features(self) -> bool:
        return self._return_remapped_features

    def forward(self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True
                ) -> Tuple[Union[KeyedTensor, Dict[str, JaggedTensor]], Optional[KeyedJaggedTensor]]:
        features = self._managed_collision_collection(features, mutate_miss_lengths=mutate_miss_lengths)
        embeddings = self._embedding_module(features)
        if not torch.compiler.is_compiling():
            # evict() reads a variable number of rows; compiled, they stay queued for the caller
            evict(self._managed_collision_collection.evict(), self._embedding_module)
        return embeddings, (features if self._return_remapped_features else None)

    def lookup_remapped_lengths_mask(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``[F*B]`` bool: the bags that still hold ids after remapping."""
        return return_remapped_lengths_as_mask(self._managed_collision_collection(features, mutate_miss_lengths=True))

    def lookup_remapped_lengths_mask_and_runtime_meta(self, features: KeyedJaggedTensor
                                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        remapped = self._managed_collision_collection(features, mutate_miss_lengths=True)
        meta = self._managed_collision_collection.lookup_custom_runtime_meta(remapped)
        return return_remapped_lengths_as_mask(remapped), return_custom_metadata(meta)


def return_remapped_lengths_as_mask(features: KeyedJaggedTensor) -> torch.Tensor:
    return features.lengths().to(torch.bool)


def return_custom_metadata(runtime_meta: torch.Tensor) -> torch.Tensor:
    return runtime_meta


torch.fx.wrap("return_remapped_lengths_as_mask")
torch.fx.wrap("return_custom_metadata")


class ManagedCollisionEmbeddingCollection(BaseManagedCollisionEmbeddingCollection):
    """An ``EmbeddingCollection`` behind managed-collision modules: returns
    (``Dict[feature, JaggedTensor]`` of ``[N, D]`` rows, remapped KJT or None)."""

    def __init__(self, embedding_collection: EmbeddingCollection,
                 managed_collision_collection: ManagedCollisionCollection, return_remapped_features: bool = False,
                 allow_in_place_embed_weight_update: bool = False) -> None:
        super().__init__(embedding_collection, managed_collision_collection, return_remapped_features,
                         allow_in_place_embed_weight_update)

    @property
    def embedding_collection(self) -> EmbeddingCollection:
        return self._embedding_module

    def embedding_configs(self):
        """The tables' configs (the planner reads them)."""
        return self._embedding_module.embedding_configs()


class ManagedCollisionEmbeddingBagCollection(BaseManagedCollisionEmbeddingCollection):
    """An ``EmbeddingBagCollection`` behind managed-collision modules: returns
    (``KeyedTensor`` of ``[B, sum(D)]``, remapped KJT or None)."""

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection,
                 managed_collision_collection: ManagedCollisionCollection, return_remapped_features: bool = False,
                 allow_in_place_embed_weight_update: bool = False) -> None:
        super().__init__(embedding_bag_collection, managed_collision_collection, return_remapped_features,
                         allow_in_place_embed_weight_update)

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollection:
        return self._embedding_module

    def embedding_bag_configs(self):
        """The tables' configs (the planner reads them)."""
        return self._embedding_module.embedding_bag_configs()
