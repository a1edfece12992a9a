"""``HashEmbeddingBagCollection``: an ``EmbeddingBagCollection`` whose tables named in
``hash_options`` take raw int64 ids (any value) and give each admitted id a row of its own,
evicting stale ids when a bucket is full (``hash_table.py`` for the state, the rules in
``jaggedrec/ops/hash_probe_torch.py``, the policy in ``docs/dynamic_ids.md``).

An evicted row is re-initialised (uniform in the table's ``[weight_init_min,
weight_init_max]``) and its fused optimizer state zeroed, whatever the optimizer, before the
new id reads it. All of it on fixed shapes with no host sync, so ``torch.compile(fullgraph=True)``
holds a training step that inserts and evicts in one graph.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from jaggedrec.modules.embedding_configs import EmbeddingBagConfig
from jaggedrec.modules.embedding_modules import EmbeddingBagCollection
from jaggedrec.modules.hash_table import HashedTable, HashTableOptions, HashTableState
from jaggedrec.optim import FusedOptimizer
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor, as_keyed_jagged_tensor

__all__ = ["HashEmbeddingBagCollection", "HashTableOptions"]


class HashEmbeddingBagCollection(EmbeddingBagCollection):
    """``EmbeddingBagCollection`` with hashed tables.

    Args:
        tables: the configs, as for ``EmbeddingBagCollection``. A hashed table's
            ``num_embeddings`` is its rows: ``(num_embeddings - 1) // bucket_size`` buckets and,
            last, the fallback row.
        hash_options: ``HashTableOptions`` by table name; tables not named stay static (ids in
            ``[0, num_embeddings)``, as in ``EmbeddingBagCollection``).
        The other arguments are ``EmbeddingBagCollection``'s (``fused_optimizer=`` included).

    ``forward(kjt)`` returns the ``KeyedTensor`` an ``EmbeddingBagCollection`` fed the remapped
    ids would return; ``remap(kjt)`` returns that KJT (training: placing and evicting ids, as
    ``forward`` does). In eval, ids are only looked up: absent ones read the fallback row.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], hash_options: Mapping[str, HashTableOptions],
                 is_weighted: bool = False, device: Optional[torch.device] = None, backend: str = "auto",
                 sparse: bool = False, validate: bool = True, bounds_check: str = "raise",
                 deterministic: bool = True, fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        names = [c.name for c in tables]
        unknown = sorted(set(hash_options) - set(names))
        if unknown:
            raise ValueError(f"hash_options name tables that are not configured: {unknown}")
        if not hash_options:
            raise ValueError("hash_options names no table: use EmbeddingBagCollection")
        for name, options in hash_options.items():
            if not isinstance(options, HashTableOptions):
                raise TypeError(f"hash_options['{name}'] must be a HashTableOptions, got {options!r}")
        super().__init__(tables, is_weighted=is_weighted, device=device, backend=backend, sparse=sparse,
                         validate=validate, bounds_check=bounds_check, deterministic=deterministic,
                         fused_optimizer=fused_optimizer)
        configs = self._layout.configs
        self._hashed_configs = [t for t, c in enumerate(configs) if c.name in hash_options]
        self.hash_state = HashTableState(
            [HashedTable(configs[t].name, configs[t].num_embeddings,
                         tuple(configs[t].feature_names or [configs[t].name]), hash_options[configs[t].name])
             for t in self._hashed_configs], device=device)
        self._reset_plan = [self._table_reset_plan(h, t) for h, t in enumerate(self._hashed_configs)]

    def _table_reset_plan(self, hashed: int, table: int):
        """What an eviction in table ``table`` writes: its init range and fused-state slices."""
        layout, config = self._layout, self._layout.configs[table]
        slot = layout.tables[table]
        group = layout.groups[slot.group]
        used = sorted({(layout.tables[layout.features[f].table].offset, layout.tables[layout.features[f].table].rows)
                       for f in group.features})
        row_base = sum(rows for offset, rows in used if offset < slot.offset)
        fused = self._options.fused_optimizer
        states = [] if fused is None else [(f"{group.name}_{name}", per) for name, per in fused.state]
        return (hashed, table, config.weight_init_min, config.weight_init_max, slot.offset, slot.rows, slot.dim,
                row_base, states)

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT with the hashed features' raw ids replaced by their rows.

        Args:
            features: KJT (any key order; not VBE), ``[N]`` ids int32 or int64.
        Returns:
            KJT of the same keys, lengths and weights, ``[N]`` rows in the ids' dtype.
        """
        features = as_keyed_jagged_tensor(features)
        if features.variable_stride_per_key():
            raise ValueError(f"{type(self).__name__}: a VBE KJT is not supported by hashed tables")
        remapped = self.hash_state.remap(features)
        if self.training:
            self._reset_evicted(remapped.table, remapped.evicted_row)
        return KeyedJaggedTensor(features.keys(), remapped.values, features.weights_or_none(),
                                 lengths=features.lengths(), offsets=features.offsets(), stride=features.stride())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """As ``EmbeddingBagCollection.forward``, over :meth:`remap`'s KJT."""
        return super().forward(self.remap(features))

    @torch.no_grad()
    def _reset_evicted(self, table: torch.Tensor, evicted_row: torch.Tensor) -> None:
        """Re-initialise each row an id was evicted from, and zero its fused optimizer state.

        Fixed shapes: every position writes, those without an eviction write the fallback
        row's own values back (so nothing changes there)."""
        state = self.fused_optimizer_state
        for hashed, t, low, high, offset, rows, dim, row_base, states in self._reset_plan:
            mask = (table == hashed) & (evicted_row >= 0)
            fallback = rows - 1
            target = torch.where(mask, evicted_row, fallback)
            weight = self.table_weight(t)
            fresh = torch.empty(target.numel(), dim, dtype=weight.dtype, device=weight.device).uniform_(low, high)
            weight.index_copy_(0, target, torch.where(mask.unsqueeze(1), fresh, weight[fallback]))
            for name, per in states:
                buffer = getattr(state, name)
                if per == "row":
                    view = buffer.narrow(0, row_base, rows)
                    view.index_copy_(0, target, torch.where(mask, 0.0, view[fallback]))
                else:
                    view = buffer.narrow(0, offset, rows * dim).view(rows, dim)
                    view.index_copy_(0, target, torch.where(mask.unsqueeze(1), 0.0, view[fallback]))

    def unplaced_counts(self) -> Dict[str, torch.Tensor]:
        """Per hashed feature, ``[]`` int64 (device): admitted ids that found no slot."""
        return self.hash_state.unplaced_counts()

    def fallback_counts(self) -> Dict[str, torch.Tensor]:
        """Per hashed feature, ``[]`` int64 (device): ids that read the fallback row."""
        return self.hash_state.fallback_counts()

    def hashed_tables(self) -> List[str]:
        """Names of the hashed tables, in config order."""
        return [self._layout.configs[t].name for t in self._hashed_configs]
