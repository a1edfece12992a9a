"""``ManagedCollisionCollection`` (TorchRec's, re-exported by ``jaggedrec.modules.mc_modules``):
one managed-collision module per table, a KJT of the tables' features in, the same features
with remapped ids out. It only routes: what an id becomes is each table's module's
(``mc_modules.MCHManagedCollisionModule``, ``hash_mc_modules.HashZchManagedCollisionModule``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig
from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

__all__ = ["ManagedCollisionCollection"]


def _features_in_order(features: KeyedJaggedTensor, feature_names: List[str]) -> KeyedJaggedTensor:
    keys = features.keys()
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(f"ManagedCollisionCollection: features {missing} are not in the input (keys: {keys})")
    order = [keys.index(f) for f in feature_names]
    return features if order == list(range(len(keys))) else features.permute(order)


def _table_input(part: KeyedJaggedTensor) -> JaggedTensor:
    return JaggedTensor(values=part.values(), lengths=part.lengths())


def _assemble(features: KeyedJaggedTensor, values: List[torch.Tensor]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=features.keys(), values=torch.cat(values), lengths=features.lengths(),
                             weights=features.weights_or_none(), stride=features.stride())


# leaves for torch.fx (TorchRec's tracer): they take KJTs and build JaggedTensors
for _fn in ("_features_in_order", "_table_input", "_assemble"):
    torch.fx.wrap(_fn)


class ManagedCollisionCollection(nn.Module):
    """One managed-collision module per table: a KJT of the tables' features in, the same
    features (in the configs' order) with remapped ids out."""

    def __init__(self, managed_collision_modules: Dict[str, nn.Module],
                 embedding_configs: Sequence[BaseEmbeddingConfig], need_preprocess: bool = True) -> None:
        super().__init__()
        self._managed_collision_modules = nn.ModuleDict(managed_collision_modules)
        self._embedding_configs = embedding_configs
        self.need_preprocess = need_preprocess
        for config in embedding_configs:
            if config.name not in managed_collision_modules:
                raise ValueError(f"Table {config.name} is not present in managed_collision_modules")
            size = managed_collision_modules[config.name].output_size()
            if size != config.num_embeddings:
                raise ValueError(f"table {config.name}: the managed-collision module's output size {size} "
                                 f"must equal num_embeddings {config.num_embeddings}")
        self._table_to_features = {c.name: list(c.feature_names) for c in embedding_configs}
        self._feature_names = [f for c in embedding_configs for f in c.feature_names]
        self._table_feature_splits = [len(c.feature_names) for c in embedding_configs]

    def embedding_configs(self) -> Sequence[BaseEmbeddingConfig]:
        return self._embedding_configs

    def table_to_number_buckets(self) -> Dict[str, int]:
        return {table: m.buckets() for table, m in self._managed_collision_modules.items()}

    def forward(self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True) -> KeyedJaggedTensor:
        features = _features_in_order(features, self._feature_names)
        parts = features.split(self._table_feature_splits)
        values: List[torch.Tensor] = []
        for i, (table, module) in enumerate(self._managed_collision_modules.items()):
            remapped = module({table: _table_input(parts[i])}, mutate_miss_lengths=mutate_miss_lengths)
            values.append(remapped[table].values())
        return _assemble(features, values)

    def lookup_runtime_meta(self, features: KeyedJaggedTensor, remapped_ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Per id runtime metadata of the modules that keep some (HashZch with write_runtime_meta_dim)."""
        parts = features.split(self._table_feature_splits)
        remapped = remapped_ids.split(self._table_feature_splits)
        metas = [module.lookup_runtime_meta(parts[i].values(), remapped[i].values()).reshape(-1)
                 for i, module in enumerate(self._managed_collision_modules.values())]
        return KeyedJaggedTensor(keys=features.keys(), values=torch.cat(metas), lengths=features.lengths(),
                                 weights=features.weights_or_none(), stride=features.stride())

    def lookup_custom_runtime_meta(self, remapped_ids: KeyedJaggedTensor) -> torch.Tensor:
        remapped = remapped_ids.split(self._table_feature_splits)
        return torch.cat([module.lookup_custom_runtime_meta(remapped[i].values())
                          for i, module in enumerate(self._managed_collision_modules.values())])

    def evict(self) -> Dict[str, Optional[torch.Tensor]]:
        return {table: m.evict() for table, m in self._managed_collision_modules.items()}

    def open_slots(self) -> Dict[str, torch.Tensor]:
        return {table: m.open_slots() for table, m in self._managed_collision_modules.items()}
