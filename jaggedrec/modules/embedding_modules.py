"""TorchRec's embedding modules over flat, table-batched storage: ``EmbeddingBagCollection``
(pooled, a ``KeyedTensor`` of ``[B, sum(dims)]``) and ``EmbeddingCollection`` (one row per id,
a ``JaggedTensor`` per feature). What they share lives in ``collection.py``; each
forward reads the batch (``batch.py``) and calls its op once per storage group (``ops/``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from jaggedrec.modules import batch as batch_reader
from jaggedrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor, as_keyed_jagged_tensor
from jaggedrec.ops import pooled as pooled_ops
from jaggedrec.ops import position_pooled as position_ops
from jaggedrec.ops import sequence as sequence_ops
from jaggedrec.optim import FusedOptimizer
from jaggedrec.modules.collection import CollectionOptions, FloatTableCollection, TableView


class EmbeddingBag(TableView):
    """One table of an ``EmbeddingBagCollection`` (see ``TableView``)."""

    def __init__(self, owner: "EmbeddingBagCollection", table: int) -> None:
        super().__init__(owner, table)
        self.mode = "mean" if owner.layout.configs[table].pooling.value == "MEAN" else "sum"

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode='{self.mode}'"


class EmbeddingBagCollection(FloatTableCollection):
    """Pools each feature's ids through its table, for all tables at once.

    Args:
        tables: one ``EmbeddingBagConfig`` per table; names must be unique.
        is_weighted: the input KJTs carry per-id weights (``[N]`` floats).
        device: where to allocate; ``"meta"`` allocates nothing.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        sparse: give the flat weights sparse COO gradients, as ``nn.EmbeddingBag(sparse=True)``.
        validate: check each batch (lengths, id ranges) and raise a ``ValueError`` naming the
            feature. On GPU the check reads one flag to the host; set False on hot paths.
        bounds_check: what the Triton kernels do with ids outside their table, which they never
            read: "raise" a ``ValueError`` naming the feature (reads one flag to the host, unless
            ``validate`` already checked the batch), "clamp" (skip them, as zero rows, and warn
            one step later without waiting for the GPU), or "off" (trust the ids).
        deterministic: Triton backward with bit-identical weight gradients (sorts the ids);
            False uses atomics, faster but with run-to-run rounding differences.
        fused_optimizer: a ``jaggedrec.optim`` config (SGD, RowWiseAdagrad, Adam): each backward
            updates the touched rows in place and no weight gradient is made. Its state lives
            in buffers beside the weights, so ``state_dict()`` holds it.

    The settings after ``tables`` and ``is_weighted`` are kept, frozen, as ``options`` (a
    ``CollectionOptions``); ``validate`` can be switched on the module.

    ``forward(kjt)`` returns a ``KeyedTensor`` of ``[B, sum(dims)]`` fp32 values whose keys are
    the tables' features in config order (``feature@table`` for a feature read by several
    tables), whatever the KJT's key order.
    """

    config_type = EmbeddingBagConfig
    view_type = EmbeddingBag
    views_name = "embedding_bags"

    def __init__(self, tables: Sequence[EmbeddingBagConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, backend: str = "auto", sparse: bool = False,
                 validate: bool = True, bounds_check: str = "raise", deterministic: bool = True,
                 fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        super().__init__(tables, device, CollectionOptions(backend, sparse, validate, bounds_check, deterministic,
                                                           fused_optimizer), is_weighted)
        self._is_weighted = is_weighted
        # position-weighted pooling reads no per-id weights: its batches need not carry any
        self._position_spec = self._spec._replace(is_weighted=None)
        self._embedding_names = self._layout.embedding_names
        self._lengths_per_embedding = self._layout.embedding_dims()
        self._feature_names = [list(c.feature_names) for c in self._layout.configs]
        self._column_runs = self._layout.column_runs()

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._layout.configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            features: KJT with keys ``K`` (any order, a superset of the configured features),
                ``[N]`` ids, ``[K*B]`` lengths or ``[K*B+1]`` offsets, and ``[N]`` weights when
                ``is_weighted``; or a VBE KJT (``stride_per_key_per_rank``, ``inverse_indices``),
                whose bags are pooled once each and read by every sample that shares them.
                jaggedrec's KJT or TorchRec's (taken as it is, its tensors shared).
        Returns:
            KeyedTensor with ``[B, sum(dims)]`` fp32 values.
        """
        return self._pool(features, None)

    def pool_position_weighted(self, features: KeyedJaggedTensor,
                               position_weights: Tuple[torch.Tensor, List[int]]) -> KeyedTensor:
        """``forward``, each id weighted by its position in its bag (the FPEBC's kernel path).

        Args:
            features: as ``forward``'s, with or without per-id weights (ignored if there).
            position_weights: ``[P]`` position weights and per key ``base, length``
                (``feature_processor_.keyed_position_table``).
        Returns:
            KeyedTensor with ``[B, sum(dims)]`` fp32 values.
        """
        return self._pool(features, position_weights)

    def _pool(self, features: KeyedJaggedTensor,
              position_weights: Optional[Tuple[torch.Tensor, List[int]]]) -> KeyedTensor:
        # kept out of forward's signature: torch.fx makes every forward argument a graph input,
        # and a traced "position_weights is not None" would always take the weighted branch
        if not self._layout.configs:  # built empty (TorchRec allows it, as a model's placeholder)
            raise ValueError("EmbeddingBagCollection has no tables: there is nothing to pool")
        features = as_keyed_jagged_tensor(features)
        # The module's own calls go through module attributes (batch_reader.read_batch, ...):
        # those are what torch.fx.wrap swaps for graph nodes while symbolic_trace runs.
        options = self._options
        spec = self._spec if position_weights is None else self._position_spec
        batch = batch_reader.read_batch(features, spec, self._groups, self._output_features, options.validate)
        outputs, bad_ids = [], []
        for i, g in enumerate(self._groups):
            if position_weights is not None:
                pooled, bad = position_ops.run_position_weighted_embedding_bags(
                    self.flat_weights[g.name], batch.values, batch.offsets, position_weights[0],
                    batch.group_inverse[i], batch.group_tables[i], position_weights[1], options.backend,
                    options.sparse, options.deterministic, *self._optimizer_args(g.name))
            else:
                pooled, bad = pooled_ops.run_pooled_embedding_bags(
                    self.flat_weights[g.name], batch.values, batch.offsets, batch.weights, batch.group_inverse[i],
                    batch.group_tables[i], options.backend, options.sparse, options.deterministic,
                    *self._optimizer_args(g.name))
            outputs.append(pooled)
            bad_ids.append(bad)
        self._handle_bad_ids(features, bad_ids, pooled)
        if len(outputs) == 1:
            pooled = outputs[0]
        else:  # tables of several dtypes: interleave their columns back into output order
            pooled = torch.cat([outputs[g].narrow(1, start, width) for g, start, width in self._column_runs], dim=1)
        return KeyedTensor(self._embedding_names, self._lengths_per_embedding, pooled)


class Embedding(TableView):
    """One table of an ``EmbeddingCollection`` (see ``TableView``)."""


class EmbeddingCollection(FloatTableCollection):
    """Looks up each feature's ids in its table, one row per id, for all tables at once.

    Args:
        tables: one ``EmbeddingConfig`` per table; names must be unique. Dims may differ
            (TorchRec's module needs one dim for all).
        device: where to allocate; ``"meta"`` allocates nothing.
        need_indices: each output JaggedTensor also carries the feature's ids, as its weights
            (TorchRec's convention).
        backend, validate, bounds_check, deterministic, sparse, fused_optimizer: as in
            ``EmbeddingBagCollection``.

    ``forward(kjt)`` returns ``Dict[str, JaggedTensor]`` in config order (keys as in the bag
    collection: the feature, or ``feature@table`` for a feature read by several tables): values
    ``[N_f, dim]`` in the table's dtype, one row per id of the feature in the KJT's order, with
    the KJT's lengths for that feature. Every feature of a dtype is gathered by one op call
    into one flat buffer, and each value is a view of it.
    """

    config_type = EmbeddingConfig
    draws_all_first = False  # TorchRec's initialises each table right after drawing it
    view_type = Embedding
    views_name = "embeddings"

    def __init__(self, tables: Sequence[EmbeddingConfig], device: Optional[torch.device] = None,
                 need_indices: bool = False, backend: str = "auto", validate: bool = True,
                 bounds_check: str = "raise", deterministic: bool = True, sparse: bool = False,
                 fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        super().__init__(tables, device, CollectionOptions(backend, sparse, validate, bounds_check, deterministic,
                                                           fused_optimizer), None)
        self._need_indices = need_indices
        self._embedding_names = self._layout.embedding_names
        self._embedding_dim = self._layout.configs[0].embedding_dim if self._layout.configs else -1
        # per output feature: its storage group and its position among the group's features
        place = {i: (g, j) for g, group in enumerate(self._groups) for j, i in enumerate(group.features)}
        self._output_places = tuple(place[i] for i in range(len(self._layout.features)))

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return list(self._layout.configs)

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        """The first table's dim (TorchRec's module has one dim for all tables)."""
        return self._embedding_dim

    def embedding_names_by_table(self) -> List[List[str]]:
        names = iter(self._embedding_names)
        return [[next(names) for _ in c.feature_names] for c in self._layout.configs]

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        """
        Args:
            features: KJT with keys ``K`` (any order, a superset of the configured features),
                ``[N]`` ids, ``[K*B]`` lengths or ``[K*B+1]`` offsets; weights are ignored.
                jaggedrec's KJT or TorchRec's (taken as it is, its tensors shared).
        Returns:
            per feature, a JaggedTensor of ``[N_f, dim]`` rows.
        """
        if not self._layout.configs:
            raise ValueError("EmbeddingCollection has no tables: there is nothing to look up")
        features = as_keyed_jagged_tensor(features)
        options = self._options
        batch = batch_reader.read_batch(features, self._spec, self._groups, self._output_features, options.validate)
        key_lengths = batch_reader.key_lengths(features, self._spec)
        flats, bad_ids = [], []
        for i, g in enumerate(self._groups):
            flat, bad = sequence_ops.run_sequence_embeddings(
                self.flat_weights[g.name], batch.values, batch.offsets, batch.group_tables[i], key_lengths,
                options.backend, options.sparse, options.deterministic, *self._optimizer_args(g.name))
            flats.append(flat)
            bad_ids.append(bad)
        self._handle_bad_ids(features, bad_ids, flat)
        return jagged_outputs(flats, features, key_lengths, self._groups, self._output_places,
                              self._embedding_names, self._need_indices)


@torch.fx.wrap  # reads the KJT's key order and id counts, which a traced graph cannot
def jagged_outputs(flats: List[torch.Tensor], kjt: KeyedJaggedTensor, key_lengths: List[int], groups,
                   output_places, embedding_names: List[str], need_indices: bool) -> Dict[str, JaggedTensor]:
    """Each output feature's rows, as a ``[N_f, dim]`` view of its group's flat output, with the KJT's
    lengths for its key (and its ids as weights when ``need_indices``)."""
    # positions and id starts from the key list and ``key_lengths``, not from the KJT's cached
    # index_per_key() and offset_per_key(): a compiled graph would guard on those caches (on
    # their values, and on whether they are filled), and recompile for each batch
    index = {key: k for k, key in enumerate(kjt.keys())}
    # each group's flat output cut into its features' [N, dim] blocks
    blocks = []
    for flat, g in zip(flats, groups):
        counts = [key_lengths[index[name]] for name in g.key_names]
        parts = torch.split(flat, [n * d for n, d in zip(counts, g.dims)])
        blocks.append([p.view(n, d) for p, n, d in zip(parts, counts, g.dims)])
    stride = kjt.stride()
    lengths = kjt.lengths().reshape(-1)
    id_starts = [0]
    for n in key_lengths:
        id_starts.append(id_starts[-1] + n)
    out: Dict[str, JaggedTensor] = {}
    for name, (g, j) in zip(embedding_names, output_places):
        k = index[groups[g].key_names[j]]
        ids = None
        if need_indices:
            ids = kjt.values().narrow(0, id_starts[k], key_lengths[k])
        out[name] = JaggedTensor(blocks[g][j], weights=ids, lengths=lengths.narrow(0, k * stride, stride))
    return out
