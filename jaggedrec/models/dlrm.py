"""DLRM (Naumov et al., 2019) and two variants, at TorchRec's path (``torchrec.models.dlrm``).

A DLRM scores a sample from ``num_dense`` dense features and ``F`` sparse features:

* ``SparseArch`` pools each sparse feature into a ``D``-vector (an ``EmbeddingBagCollection``):
  ``[B, F, D]``;
* ``DenseArch`` maps the dense features to one more ``D``-vector by an MLP: ``[B, D]``;
* an interaction arch combines the ``F + 1`` vectors: ``InteractionArch`` (DLRM: the pairwise
  dot products), ``InteractionDCNArch`` (DLRM_DCN: a low-rank cross net over all of them) or
  ``InteractionProjectionArch`` (DLRM_Projection: dot products of two learned projections);
* ``OverArch``, an MLP with a linear last layer, turns that into one logit per sample.

``DLRMTrain`` wraps a DLRM with the binary cross-entropy loss over a ``Batch``. Submodule and
parameter names are TorchRec's (``sparse_arch.embedding_bag_collection...``,
``dense_arch.model._mlp.0._linear.weight``, ``over_arch.model.1.weight`` ...), so that state
dicts load across the two libraries.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from jaggedrec.datasets.utils import Batch
from jaggedrec.modules.crossnet import LowRankCrossNet
from jaggedrec.modules.embedding_configs import ConfigError
from jaggedrec.modules.embedding_modules import EmbeddingBagCollection
from jaggedrec.modules.mlp import MLP
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def choose(n: int, k: int) -> int:
    """The binomial coefficient ``n`` over ``k`` (0 outside ``0 <= k <= n``)."""
    if not 0 <= k <= n:
        return 0
    k = min(k, n - k)
    num = den = 1
    for i in range(k):
        num *= n - i
        den *= i + 1
    return num // den


def _shared_dim(ebc: EmbeddingBagCollection) -> int:
    """The one embedding dim of ``ebc``'s tables, read from the configs (so an EBC built on
    ``meta`` works)."""
    configs = ebc.embedding_bag_configs()
    if not configs:
        raise ConfigError("DLRM: the embedding bag collection has no tables; it needs at least one")
    dims = {c.name: c.embedding_dim for c in configs}
    if len(set(dims.values())) != 1:
        raise ConfigError(f"DLRM: every table must have the same embedding_dim, got {dims}")
    return configs[0].embedding_dim


class SparseArch(nn.Module):
    """The embedding lookups: one pooled ``D``-vector per sparse feature.

    Args:
        embedding_bag_collection: its tables all of one dim ``D``; ``F`` features in all.

    Shapes: a KJT of batch size ``B`` -> ``[B, F, D]``, features in the configs' order.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding_bag_collection: EmbeddingBagCollection = embedding_bag_collection
        self.D: int = _shared_dim(embedding_bag_collection)
        self._sparse_feature_names: List[str] = [
            f for c in embedding_bag_collection.embedding_bag_configs() for f in c.feature_names]
        self.F: int = len(self._sparse_feature_names)

    @property
    def sparse_feature_names(self) -> List[str]:
        return self._sparse_feature_names

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features)
        return _concat_in_feature_order(pooled, self._sparse_feature_names).reshape(-1, self.F, self.D)


@torch.fx.wrap  # one node of a torch.fx graph: the branch reads the output's keys
def _concat_in_feature_order(pooled: KeyedTensor, names: List[str]) -> torch.Tensor:
    """``[B, F * D]`` the pooled values with features in ``names``' order: the values as they
    are when the collection already orders them so, else a copy (a sharded one may not)."""
    if pooled.keys() == names:
        return pooled.values()
    by_name = pooled.to_dict()
    return torch.cat([by_name[f] for f in names], dim=1)


class DenseArch(nn.Module):
    """An MLP with ReLUs over the dense features.

    Args:
        in_features: dense features per sample.
        layer_sizes: the MLP's widths; the last is ``D``.
        device: of the weights.

    Shapes: ``[B, in_features]`` -> ``[B, layer_sizes[-1]]``.
    """

    def __init__(self, in_features: int, layer_sizes: List[int], device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.model: nn.Module = MLP(in_features, layer_sizes, bias=True, activation="relu", device=device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)


def _stacked(dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
    """The dense vector first, then the ``F`` sparse ones: ``[B, D]``, ``[B, F, D]`` ->
    ``[B, F + 1, D]``."""
    return torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)


class InteractionArch(nn.Module):
    """DLRM's interaction: the dense vector, then the dot product of every pair of distinct
    vectors among the ``F + 1`` (dense first, pairs in row-major upper-triangle order).

    Args:
        num_sparse_features: ``F``.

    Shapes: ``[B, D]``, ``[B, F, D]`` -> ``[B, D + (F + 1) F / 2]``; with ``F == 0`` the dense
    input is returned.
    """

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__()
        self.F: int = num_sparse_features
        # the (i, j), i < j, entries of the (F+1) x (F+1) Gram matrix; not saved in state dicts
        self.register_buffer("triu_indices", torch.triu_indices(self.F + 1, self.F + 1, offset=1), persistent=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense_features
        vectors = _stacked(dense_features, sparse_features)
        gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, F+1, F+1]
        return torch.cat((dense_features, gram[:, self.triu_indices[0], self.triu_indices[1]]), dim=1)


class InteractionDCNArch(nn.Module):
    """DLRM_DCN's interaction: ``crossnet`` over the ``F + 1`` vectors laid end to end.

    Args:
        num_sparse_features: ``F``.
        crossnet: a module ``[B, (F + 1) D]`` -> ``[B, (F + 1) D]`` (a ``LowRankCrossNet``).

    Shapes: ``[B, D]``, ``[B, F, D]`` -> ``[B, (F + 1) D]``.
    """

    def __init__(self, num_sparse_features: int, crossnet: nn.Module) -> None:
        super().__init__()
        self.F: int = num_sparse_features
        self.crossnet = crossnet

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense_features
        return self.crossnet(_stacked(dense_features, sparse_features).reshape(dense_features.shape[0], -1))


class InteractionProjectionArch(nn.Module):
    """DLRM_Projection's interaction: two branches project the ``F + 1`` vectors (laid end to
    end) to ``F1`` and ``F2`` new ``D``-vectors; the output is the dense vector and all
    ``F1 * F2`` dot products between the two sets.

    Args:
        num_sparse_features: ``F``.
        interaction_branch1: ``[B, (F + 1) D]`` -> ``[B, F1 * D]``.
        interaction_branch2: ``[B, (F + 1) D]`` -> ``[B, D * F2]``.

    Shapes: ``[B, D]``, ``[B, F, D]`` -> ``[B, D + F1 * F2]``.
    """

    def __init__(self, num_sparse_features: int, interaction_branch1: nn.Module,
                 interaction_branch2: nn.Module) -> None:
        super().__init__()
        self.F: int = num_sparse_features
        self.interaction_branch1 = interaction_branch1
        self.interaction_branch2 = interaction_branch2

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense_features
        B, D = dense_features.shape
        flat = _stacked(dense_features, sparse_features).reshape(B, -1)
        left = self.interaction_branch1(flat).reshape(B, -1, D)  # [B, F1, D]
        right = self.interaction_branch2(flat).reshape(B, D, -1)  # [B, D, F2]
        return torch.cat((dense_features, torch.bmm(left, right).reshape(B, -1)), dim=1)


class OverArch(nn.Module):
    """The top MLP: ReLU layers, then a linear last layer (the logits).

    Args:
        in_features: the interaction's output width.
        layer_sizes: the widths, at least two; the last is the number of logits.
        device: of the weights.

    Shapes: ``[B, in_features]`` -> ``[B, layer_sizes[-1]]``.
    """

    def __init__(self, in_features: int, layer_sizes: List[int], device: Optional[torch.device] = None) -> None:
        super().__init__()
        if len(layer_sizes) <= 1:
            raise ValueError(f"OverArch: layer_sizes {layer_sizes} must have at least two layers")
        self.model: nn.Module = nn.Sequential(
            MLP(in_features, layer_sizes[:-1], bias=True, activation="relu", device=device),
            nn.Linear(layer_sizes[-2], layer_sizes[-1], bias=True, device=device),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)


class DLRM(nn.Module):
    """DLRM: sparse, dense, interaction and over arches.

    Args:
        embedding_bag_collection: the sparse features' tables, all of one dim ``D`` (it may
            be on ``meta``, to be placed later by ``DistributedModelParallel``).
        dense_in_features: dense features per sample.
        dense_arch_layer_sizes: the dense MLP's widths; the last must be ``D``.
        over_arch_layer_sizes: the over arch's widths (at least two), the last the logits.
        dense_device: where the dense arches' weights are made.

    Shapes: ``dense_features`` ``[B, dense_in_features]``, ``sparse_features`` a KJT of batch
    size ``B`` -> logits ``[B, over_arch_layer_sizes[-1]]``.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int,
                 dense_arch_layer_sizes: List[int], over_arch_layer_sizes: List[int],
                 dense_device: Optional[torch.device] = None) -> None:
        super().__init__()
        self._cuda_graph_enabled: bool = False
        D = _shared_dim(embedding_bag_collection)
        if dense_arch_layer_sizes[-1] != D:
            raise ValueError(f"DLRM: the dense arch's last layer size ({dense_arch_layer_sizes[-1]}) must equal the "
                             f"embedding dim ({D})")
        self.sparse_arch: SparseArch = SparseArch(embedding_bag_collection)
        F = len(self.sparse_arch.sparse_feature_names)
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes, device=dense_device)
        self.inter_arch: nn.Module = InteractionArch(num_sparse_features=F)
        self.over_arch = OverArch(D + choose(F, 2) + F, over_arch_layer_sizes, device=dense_device)

    def compile_dense_path(self, compile_mode: str = "reduce-overhead") -> None:
        """``torch.compile`` the dense, interaction and over arches (the lookups stay eager);
        a second call does nothing."""
        if self._cuda_graph_enabled:
            return
        self.dense_arch = torch.compile(self.dense_arch, mode=compile_mode)
        self.inter_arch = torch.compile(self.inter_arch, mode=compile_mode)
        self.over_arch = torch.compile(self.over_arch, mode=compile_mode)
        self._cuda_graph_enabled = True

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        dense = self.dense_arch(dense_features)
        sparse = self.sparse_arch(sparse_features)
        return self.over_arch(self.inter_arch(dense_features=dense, sparse_features=sparse))


class DLRM_Projection(DLRM):
    """DLRM with ``InteractionProjectionArch``.

    Args (beyond ``DLRM``'s):
        interaction_branch1_layer_sizes: branch 1's MLP widths; the last is ``F1 * D``.
        interaction_branch2_layer_sizes: branch 2's MLP widths; the last is ``D * F2``.

    Shapes: as ``DLRM``; the over arch takes ``D + F1 * F2`` features.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int,
                 dense_arch_layer_sizes: List[int], over_arch_layer_sizes: List[int],
                 interaction_branch1_layer_sizes: List[int], interaction_branch2_layer_sizes: List[int],
                 dense_device: Optional[torch.device] = None) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_arch_layer_sizes, over_arch_layer_sizes,
                         dense_device)
        D = _shared_dim(embedding_bag_collection)
        F = len(self.sparse_arch.sparse_feature_names)
        projected = []
        for which, sizes in (("branch1", interaction_branch1_layer_sizes), ("branch2", interaction_branch2_layer_sizes)):
            if sizes[-1] % D:
                raise ValueError(f"DLRM_Projection: the interaction {which}'s last layer size ({sizes[-1]}) is not a "
                                 f"multiple of the embedding dim ({D})")
            projected.append(sizes[-1] // D)
        in_features = F * D + dense_arch_layer_sizes[-1]
        self.inter_arch = InteractionProjectionArch(
            num_sparse_features=F,
            interaction_branch1=DenseArch(in_features, interaction_branch1_layer_sizes, device=dense_device),
            interaction_branch2=DenseArch(in_features, interaction_branch2_layer_sizes, device=dense_device),
        )
        self.over_arch = OverArch(D + projected[0] * projected[1], over_arch_layer_sizes, device=dense_device)


class DLRM_DCN(DLRM):
    """DLRM with ``InteractionDCNArch`` over a ``LowRankCrossNet`` (DCN-v2).

    Args (beyond ``DLRM``'s):
        dcn_num_layers: cross layers.
        dcn_low_rank_dim: their rank ``r``.

    Shapes: as ``DLRM``; the over arch takes ``(F + 1) D`` features.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, dense_in_features: int,
                 dense_arch_layer_sizes: List[int], over_arch_layer_sizes: List[int], dcn_num_layers: int,
                 dcn_low_rank_dim: int, dense_device: Optional[torch.device] = None) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_arch_layer_sizes, over_arch_layer_sizes,
                         dense_device)
        D = _shared_dim(embedding_bag_collection)
        F = len(self.sparse_arch.sparse_feature_names)
        # the cross net is made on the default device, as TorchRec makes it
        crossnet = LowRankCrossNet(in_features=(F + 1) * D, num_layers=dcn_num_layers, low_rank=dcn_low_rank_dim)
        self.inter_arch = InteractionDCNArch(num_sparse_features=F, crossnet=crossnet)
        self.over_arch = OverArch((F + 1) * D, over_arch_layer_sizes, device=dense_device)


class DLRMTrain(nn.Module):
    """A DLRM with its training loss: binary cross-entropy on the logits.

    Args:
        dlrm_module: a ``DLRM`` (or variant) with one logit per sample.

    ``forward(batch)`` returns ``(loss, (loss, logits, labels))``, the inner three detached:
    ``loss`` a scalar, ``logits`` ``[B]``, ``labels`` ``[B]`` as given.
    """

    def __init__(self, dlrm_module: DLRM) -> None:
        super().__init__()
        self.model = dlrm_module
        self.loss_fn: nn.Module = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


__all__ = ["DLRM", "DLRMTrain", "DLRM_DCN", "DLRM_Projection", "DenseArch", "InteractionArch", "InteractionDCNArch",
           "InteractionProjectionArch", "OverArch", "SparseArch", "choose"]
