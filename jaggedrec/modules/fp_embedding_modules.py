"""``FeatureProcessedEmbeddingBagCollection`` at TorchRec's path: a weighted
``EmbeddingBagCollection`` whose per-id weights come from feature processors.

With position weights (``PositionWeightedModule`` per feature, or a
``PositionWeightedModuleCollection``) the collection pools with
``jaggedrec::position_weighted_embedding_bags``, which takes the concatenated position
weights, not per-id weights: the kernels read each id's weight by its position inside the
gather, and the torch path builds the ``[N]`` weights inside the op (one running sum, one
gather, no autograd graph). Sparse gradients, and any other processor, take the weighted-KJT
route: the processors give ``[N]`` weights (position weights in one gather,
``feature_processor_.gather_position_weights``; others feature by feature, as TorchRec runs
them) and the collection pools with those. The processors' parameters are ordinary dense
parameters: with a fused optimizer on the tables they train with the dense optimizer.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

from jaggedrec.modules.embedding_modules import EmbeddingBagCollection
from jaggedrec.modules import feature_processor_
from jaggedrec.modules.feature_processor_ import (FeatureProcessor, FeatureProcessorsCollection,
                                                  position_weight_tables, with_weights)
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor, as_keyed_jagged_tensor

_OWNER = "FeatureProcessedEmbeddingBagCollection"


class FeatureProcessorDictWrapper(FeatureProcessorsCollection):
    """A ``{feature: FeatureProcessor}`` ModuleDict as one collection processor (what
    :meth:`FeatureProcessedEmbeddingBagCollection.split` returns for that form); keys
    without a processor get weight 1."""

    def __init__(self, feature_processors: nn.ModuleDict) -> None:
        super().__init__()
        self._feature_processors = feature_processors

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return process_features(self._feature_processors, features, _OWNER)


def process_features(processors: nn.Module, features: KeyedJaggedTensor, owner: str) -> KeyedJaggedTensor:
    """``features`` (jaggedrec's or TorchRec's KJT) with the per-id weights ``processors`` give:
    position weights read in one gather where every processor is one, else a ``{feature:
    processor}`` ModuleDict applied key by key, else one collection processor on the whole KJT.
    ``owner`` names the module in errors."""
    tables = position_weight_tables(processors)
    if tables is not None:
        # through the module: the name torch.fx.wrap swaps for a graph node while tracing
        return feature_processor_.position_weighted_kjt(features, tables, owner)
    if isinstance(processors, nn.ModuleDict):
        return apply_feature_processors_to_kjt(as_keyed_jagged_tensor(features), processors)
    return as_keyed_jagged_tensor(processors(features))


def apply_feature_processors_to_kjt(features: KeyedJaggedTensor,
                                    feature_processors: Mapping[str, nn.Module]) -> KeyedJaggedTensor:
    """``features`` weighted by ``feature_processors`` (per key; 1 for keys without one)."""
    parts = []
    jts = features.to_dict()
    for key in features.keys():
        jt = jts[key]
        if key in feature_processors:
            parts.append(feature_processors[key](jt).weights())
        else:
            parts.append(torch.ones(jt.values().shape[0], device=jt.values().device))
    weights = torch.cat(parts) if parts else features.weights_or_none()
    return with_weights(features, weights)


class FeatureProcessedEmbeddingBagCollection(nn.Module):
    """A weighted ``EmbeddingBagCollection`` fed by feature processors.

    Args:
        embedding_bag_collection: the tables; must be built with ``is_weighted=True``.
        feature_processors: ``{feature: FeatureProcessor}`` covering exactly the collection's
            features, or one ``FeatureProcessorsCollection`` (keys it does not process get
            weight 1).

    ``forward(kjt)`` returns the collection's ``KeyedTensor`` (``[B, sum(dims)]``); the KJT's
    own weights, if any, are replaced. ``state_dict`` keys are TorchRec's:
    ``_embedding_bag_collection.embedding_bags.<table>.weight`` and
    ``_feature_processors.<feature>.position_weight`` or
    ``_feature_processors.position_weights.<feature>``.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection,
                 feature_processors: Union[Dict[str, FeatureProcessor], FeatureProcessorsCollection]) -> None:
        super().__init__()
        self._embedding_bag_collection = embedding_bag_collection
        features: List[str] = []
        for config in embedding_bag_collection.embedding_bag_configs():
            features.extend(f for f in config.feature_names if f not in features)
        self._feature_names = features
        self._feature_processors: Union[nn.ModuleDict, FeatureProcessorsCollection]
        if isinstance(feature_processors, FeatureProcessorsCollection):
            self._feature_processors = feature_processors
        else:
            given = set(feature_processors)
            if given != set(features):
                raise ValueError(f"{_OWNER}: the feature processors' features {sorted(given)} must be the "
                                 f"collection's features {sorted(features)} (missing: {sorted(set(features) - given)}, "
                                 f"unknown: {sorted(given - set(features))})")
            self._feature_processors = nn.ModuleDict(feature_processors)
        if not embedding_bag_collection.is_weighted():
            raise ValueError(f"{_OWNER}: the EmbeddingBagCollection must be built with is_weighted=True to take "
                             "the feature processors' weights")

    def split(self) -> Tuple[FeatureProcessorsCollection, EmbeddingBagCollection]:
        """The processors as one ``FeatureProcessorsCollection``, and the collection."""
        if isinstance(self._feature_processors, nn.ModuleDict):
            return FeatureProcessorDictWrapper(self._feature_processors), self._embedding_bag_collection
        return self._feature_processors, self._embedding_bag_collection

    def is_weighted(self) -> bool:
        return self._embedding_bag_collection.is_weighted()

    def embedding_bag_configs(self):
        return self._embedding_bag_collection.embedding_bag_configs()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            features: KJT of keys ``K`` (any order, a superset of the features), ``[N]`` ids;
                VBE too. jaggedrec's or TorchRec's.
        Returns:
            KeyedTensor with ``[B, sum(dims)]`` fp32 values, as the collection's.
        """
        ebc = self._embedding_bag_collection
        tables = position_weight_tables(self._feature_processors)
        if tables is not None and not ebc.options.sparse:
            # position weights read by position inside the op: the kernels read them in the
            # gather; the torch path builds the [N] weights there, without autograd, in one
            # running sum and one gather (sparse gradients take the weighted-KJT route below)
            return pool_by_position(ebc, features, tables)
        return ebc(process_features(self._feature_processors, features, _OWNER))


@torch.fx.wrap  # one node of a torch.fx graph: it reads the batch's layout
def pool_by_position(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor,
                     tables: Dict[str, torch.Tensor]) -> KeyedTensor:
    """``ebc``'s pooled ``[B, sum(dims)]`` KeyedTensor of ``features`` (jaggedrec's or TorchRec's
    KJT), each id weighted by ``tables[key][position in its bag]`` (1 for keys not in ``tables``)."""
    features = as_keyed_jagged_tensor(features)
    position_weights = feature_processor_.keyed_position_table(features, tables, _OWNER)
    return ebc.pool_position_weighted(features, position_weights)
