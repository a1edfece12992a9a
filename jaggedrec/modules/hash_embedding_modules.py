"""``HashEmbeddingBagCollection``: an ``EmbeddingBagCollection`` whose tables named in
``hash_options`` take raw int64 ids (any value) and give each admitted id a row of its own,
evicting stale ids when a bucket is full (``hash_table.py`` for the state, the rules in
``jaggedrec/ops/hash_probe_torch.py``, the policy in ``docs/dynamic_ids.md``).

An evicted row is re-initialised (uniform in the table's ``[weight_init_min,
weight_init_max]``, a counter-based draw keyed by ``(reset_seed, step, table, row)``: see
``hash_probe_torch.fresh_uniform``) and its fused optimizer state zeroed, whatever the
optimizer, before the new id reads it. All of it on fixed shapes with no host sync, so ``torch.compile(fullgraph=True)``
holds a training step that inserts and evicts in one graph.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from jaggedrec.modules.embedding_configs import EmbeddingBagConfig
from jaggedrec.modules.embedding_modules import EmbeddingBagCollection
from jaggedrec.modules.hash_table import HashedTable, HashTableOptions, HashTableState
from jaggedrec.ops import hash_probe
from jaggedrec.ops import hash_probe_torch as hp
from jaggedrec.ops.backends import use_kernels
from jaggedrec.optim import FusedOptimizer
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor, as_keyed_jagged_tensor

__all__ = ["HashEmbeddingBagCollection", "HashTableOptions", "reset_rows"]


class ResetPlan(NamedTuple):
    """What re-initialising a row of one table writes."""

    table: int  # the collection's table index
    hashed: int  # its index among the hashed tables (-1: not known to the caller)
    init_min: float
    init_max: float
    offset: int  # the table's first element in its storage group's flat weights
    rows: int
    dim: int
    row_base: int  # the table's first entry in the group's row-wise fused state
    states: tuple  # ((fused state buffer name, "row" or "element"), ...)


def table_reset_plan(collection: EmbeddingBagCollection, table: int, hashed: int = -1) -> ResetPlan:
    """The :class:`ResetPlan` of ``collection``'s table ``table``."""
    layout, config = collection.layout, collection.layout.configs[table]
    slot = layout.tables[table]
    group = layout.groups[slot.group]
    used = sorted({(layout.tables[layout.features[f].table].offset, layout.tables[layout.features[f].table].rows)
                   for f in group.features})
    row_base = sum(rows for offset, rows in used if offset < slot.offset)
    fused = collection.options.fused_optimizer
    states = () if fused is None else tuple((f"{group.name}_{name}", per) for name, per in fused.state)
    return ResetPlan(table, hashed, config.weight_init_min, config.weight_init_max, slot.offset, slot.rows, slot.dim,
                     row_base, states)


@torch.no_grad()
def reset_rows(collection: EmbeddingBagCollection, table: int, rows: torch.Tensor) -> None:
    """Re-initialise rows ``rows`` (``[M]`` int64, distinct, eager) of ``collection``'s table
    ``table`` uniformly in its init range and zero their fused optimizer state (a sharded
    hashed table's rank does this for the rows its ids were evicted from)."""
    if rows.numel() == 0:
        return
    plan = table_reset_plan(collection, table)
    weight = collection.table_weight(table)
    weight.index_copy_(0, rows, torch.empty(rows.numel(), plan.dim, dtype=weight.dtype,
                                            device=weight.device).uniform_(plan.init_min, plan.init_max))
    state = collection.fused_optimizer_state
    for name, per in plan.states:
        buffer = getattr(state, name)
        if per == "row":
            buffer.narrow(0, plan.row_base, plan.rows).index_fill_(0, rows, 0.0)
        else:
            buffer.narrow(0, plan.offset, plan.rows * plan.dim).view(plan.rows, plan.dim).index_fill_(0, rows, 0.0)


class _ResetGroup(NamedTuple):
    """Hashed tables whose evicted rows one compact write re-initialises (tensors ``[H]``, by
    hashed table; rows of the group's view are ``base[table] + row``)."""

    plan: ResetPlan  # a member's (the view's table when not flat)
    dim: int
    flat: bool  # rows of the storage group's flat tensor (else the one table's own view)
    every_table: bool  # holds every hashed table: no selection
    member: torch.Tensor  # bool
    init_range: Optional[Tuple[float, float]]  # the members' common (min, max), if one
    low: torch.Tensor  # float32
    span: torch.Tensor  # float32: max - min (as _scaled takes it)
    high: torch.Tensor
    weight_base: torch.Tensor  # int64: the table's first row in the view (element state too)
    row_base: torch.Tensor  # int64: the table's first entry in row-wise state
    states: tuple  # ((fused state buffer name, "row" or "element"), ...)


def _scaled(unit: torch.Tensor, low: float, high: float, dtype: torch.dtype) -> torch.Tensor:
    """``[P, D]`` values in ``[0, 1)`` -> ``low + (high - low) * value`` in ``dtype``, kept in
    ``[low, high]`` (fp32 rounding could step past ``high``)."""
    return unit.mul(high - low).add_(low).clamp_(low, high).to(dtype)


def _group_values(group: _ResetGroup, unit: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[P, group.dim]`` fresh row values from ``[P, >= group.dim]`` draws in ``[0, 1)``: scaled
    to the members' common init range, or to each position's own table's (``tables``: ``[P]``
    hashed table index), and kept inside it."""
    unit = unit.narrow(1, 0, group.dim)
    if group.init_range is not None:
        return _scaled(unit, *group.init_range, dtype)
    low, span, high = (c.index_select(0, tables).unsqueeze(1) for c in (group.low, group.span, group.high))
    return torch.minimum(torch.maximum(unit * span + low, low), high).to(dtype)


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
        self._probe_cache: Dict[tuple, List[hash_probe.KeyTable]] = {}
        self._reset_plan = [table_reset_plan(self, t, h) for h, t in enumerate(self._hashed_configs)]
        self._reset_dim = max(plan.dim for plan in self._reset_plan)
        self._reset_groups = self._make_reset_groups()
        # the key of evicted rows' fresh values (hash_probe_torch.fresh_uniform), drawn from
        # torch's generator: torch.manual_seed before construction makes them reproducible
        self.reset_seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))

    def _make_reset_groups(self) -> List[_ResetGroup]:
        """The compact reset's writes: hashed tables of one storage group and one dim whose rows
        are rows of the group's flat tensor (offset a multiple of the dim) share one write;
        any other table has its own."""
        by_key: Dict[tuple, List[ResetPlan]] = {}
        for plan in self._reset_plan:
            table = self._layout.tables[plan.table]
            flat = table.stride == plan.dim and plan.offset % plan.dim == 0
            by_key.setdefault((table.group, plan.dim) if flat else ("own", plan.table), []).append(plan)
        device, count = self.hash_state.keys.device, len(self._reset_plan)
        groups = []
        for key, plans in by_key.items():
            flat = key[0] != "own"

            def column(value, dtype):
                out = [0] * count
                for plan in plans:
                    out[plan.hashed] = value(plan)
                return torch.tensor(out, dtype=dtype, device=device)

            member = column(lambda plan: 1, torch.bool)
            ranges = {(plan.init_min, plan.init_max) for plan in plans}
            groups.append(_ResetGroup(
                plans[0], plans[0].dim, flat, len(plans) == count, member,
                ranges.pop() if len(ranges) == 1 else None, column(lambda plan: plan.init_min, torch.float32),
                column(lambda plan: plan.init_max - plan.init_min, torch.float32),
                column(lambda plan: plan.init_max, torch.float32),
                column(lambda plan: plan.offset // plan.dim if flat else 0, torch.int64),
                column(lambda plan: plan.row_base if flat else 0, torch.int64), plans[0].states))
        return groups

    def _group_view(self, group: _ResetGroup, buffer: Optional[torch.Tensor], per: str = "element") -> torch.Tensor:
        """The rows a group's bases index: the weights (``buffer`` None) or a fused-state buffer."""
        plan = group.plan
        t, offset, rows, dim, row_base = plan.table, plan.offset, plan.rows, plan.dim, plan.row_base
        if buffer is None:
            if not group.flat:
                return self.table_weight(t)
            buffer = self._flat(self._layout.tables[t])
        if per == "row":
            return buffer if group.flat else buffer.narrow(0, row_base, rows)
        if not group.flat:
            return buffer.narrow(0, offset, rows * dim).view(rows, dim)
        return buffer.narrow(0, 0, buffer.numel() // dim * dim).view(-1, dim)

    def _reset_compact(self, table: torch.Tensor, evicted_row: torch.Tensor, fresh: torch.Tensor) -> None:
        """The eager CPU reset: ``[E]`` evictions (all real), one write per reset group."""
        state = self.fused_optimizer_state
        for group in self._reset_groups:
            tables, rows, values = table, evicted_row, fresh
            if not group.every_table:
                at = group.member.index_select(0, table).nonzero().squeeze(1)
                tables, rows, values = table.index_select(0, at), evicted_row.index_select(0, at), fresh.index_select(0, at)
            weight = self._group_view(group, None)
            weight.index_copy_(0, group.weight_base.index_select(0, tables) + rows,
                               _group_values(group, values, tables, weight.dtype))
            if group.states:
                state_rows = group.row_base.index_select(0, tables) + rows
            for name, per in group.states:
                base = state_rows if per == "row" else group.weight_base.index_select(0, tables) + rows
                self._group_view(group, getattr(state, name), per).index_fill_(0, base, 0.0)

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
        """As ``EmbeddingBagCollection.forward``, over :meth:`remap`'s KJT. In eval on the
        Triton path (fp32 tables, unweighted), one launch probes and pools: no remapped KJT."""
        features = as_keyed_jagged_tensor(features)
        if not self.training and self._can_probe(features):
            return self._probe_forward(features)
        return super().forward(self.remap(features))

    def _can_probe(self, features: KeyedJaggedTensor) -> bool:
        groups = self._layout.groups
        return (use_kernels(self._options.backend, self.device) and not self._is_weighted and len(groups) == 1
                and groups[0].dtype == torch.float32 and not features.variable_stride_per_key())

    def probe_tables(self, keys: Sequence[str]) -> List[hash_probe.KeyTable]:
        """What the probe-and-gather launch needs of each KJT key (in ``keys``' order)."""
        cached = self._probe_cache.get(tuple(keys))
        if cached is not None:
            return cached
        layout, state = self._layout, self.hash_state
        hashed = {t: h for h, t in enumerate(self._hashed_configs)}
        columns, column = {}, 0
        for f in layout.features:
            columns.setdefault(f.feature, (f, column))
            column += layout.tables[f.table].dim
        out = []
        for k in keys:
            if k not in columns:  # not read by this collection: its bags pool nothing
                out.append(hash_probe.KeyTable(0, 0, 0, False, False))
                continue
            f, column = columns[k]
            slot, config = layout.tables[f.table], layout.configs[f.table]
            mean = f.pooling == 1
            if f.table in hashed:
                h = hashed[f.table]
                base = state.slot_base(h)
                out.append(hash_probe.KeyTable(slot.offset, slot.dim, column, mean, True, base // state.bucket_size,
                                               (config.num_embeddings - 1) // state.bucket_size, base,
                                               config.num_embeddings - 1))
            else:
                out.append(hash_probe.KeyTable(slot.offset, slot.dim, column, mean, False))
        self._probe_cache[tuple(keys)] = out
        return out

    def _probe_forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        tables = self.probe_tables(keys)
        flat = next(iter(self.flat_weights.values()))
        pooled, fallback = hash_probe.probe_pooled_triton(
            self.hash_state.keys, self.hash_state.bucket_size, flat.detach(), features.values(), features.offsets(),
            hash_probe.probe_meta(tables, flat.device), features.stride(), sum(self._lengths_per_embedding),
            max(t.dim for t in tables), hash_probe.probe_alignment(tables))
        key_feature = self.hash_state.key_maps(keys, flat.device)[1]
        scratch = len(self.hash_state.features)
        self.hash_state.fallback.index_add_(0, key_feature.clamp(max=scratch - 1),
                                            torch.where(key_feature < scratch, fallback, 0))
        return KeyedTensor(self._embedding_names, self._lengths_per_embedding, pooled)

    @torch.no_grad()
    def _reset_evicted(self, table: torch.Tensor, evicted_row: torch.Tensor) -> None:
        """Re-initialise each row an id was evicted from, and zero its fused optimizer state
        (``[E]`` hashed table and row of each eviction, as :class:`Remapped` gives them).

        The fresh values are ``hash_probe_torch.fresh_uniform``'s counter-based draw, keyed by
        (``reset_seed``, step, table, row), scaled to the table's init range: one draw for all
        tables, no generator state. Eager CPU writes the evicted rows only; fixed shapes (graphs,
        GPUs) write at every position, those without an eviction writing a fallback row's own
        values back (so nothing changes there)."""
        compact = self.hash_state.compacts(evicted_row)  # eager CPU: remap listed the evictions only
        fresh = hp.fresh_uniform(self.reset_seed, self.hash_state.step, table, evicted_row, self._reset_dim)
        if compact:
            self._reset_compact(table, evicted_row, fresh)
            return
        for group in self._reset_groups:
            if group.flat:
                self._reset_fixed(group, table, evicted_row, fresh)
            else:
                self._reset_fixed_own(group.plan, table, evicted_row, fresh)

    def _reset_fixed(self, group: _ResetGroup, table: torch.Tensor, evicted_row: torch.Tensor,
                     fresh: torch.Tensor) -> None:
        """The fixed-shape reset of a flat group: ``[N]`` positions (table ``H`` and row ``-1``
        where none evicted), one write a buffer. The writes index the flat tensors themselves (1-D,
        element by element): a compiled graph then scatters in place, where writes through a
        table's narrowed view (or through views of one tensor of two dims) made it copy the whole
        flat tensor every step. Positions that evicted nothing rewrite the first member's fallback
        row (no id ever takes it) with its own values."""
        plan = group.plan
        offset, rows, dim, row_base = plan.offset, plan.rows, plan.dim, plan.row_base
        real = evicted_row >= 0
        tables = table.clamp(max=group.member.numel() - 1)  # not hashed (H): not real either
        if not group.every_table:
            real = real & group.member.index_select(0, tables)
        flat = self._flat(self._layout.tables[plan.table])
        dummy = offset // dim + rows - 1  # in rows of dim elements
        target = torch.where(real, group.weight_base.index_select(0, tables) + evicted_row, dummy)
        columns = torch.arange(dim, dtype=torch.int64, device=target.device)
        elements = (target.unsqueeze(1) * dim + columns).view(-1)  # [N * dim]
        dummy_elements = columns + dummy * dim
        values = _group_values(group, fresh, tables, flat.dtype)
        keep = real.unsqueeze(1)
        flat.index_put_((elements,), torch.where(keep, values, flat.index_select(0, dummy_elements)).view(-1))
        state = self.fused_optimizer_state
        for name, per in group.states:
            buffer = getattr(state, name)
            if per == "row":
                dummy_row = row_base + rows - 1
                at = torch.where(real, group.row_base.index_select(0, tables) + evicted_row, dummy_row)
                buffer.index_put_((at,), torch.where(real, 0.0, buffer[dummy_row]))
            else:
                buffer.index_put_((elements,), torch.where(keep, 0.0, buffer.index_select(0, dummy_elements)).view(-1))

    def _reset_fixed_own(self, plan: ResetPlan, table: torch.Tensor, evicted_row: torch.Tensor,
                         fresh: torch.Tensor) -> None:
        """The fixed-shape reset of a table not flat in its storage (a stride past its dim, or an
        offset off the dim's grid): writes through the table's own views."""
        offset, rows, dim, row_base = plan.offset, plan.rows, plan.dim, plan.row_base
        state = self.fused_optimizer_state
        mask = (table == plan.hashed) & (evicted_row >= 0)
        weight = self.table_weight(plan.table)
        fallback = rows - 1
        target = torch.where(mask, evicted_row, fallback)
        values = _scaled(fresh.narrow(1, 0, dim), plan.init_min, plan.init_max, weight.dtype)
        weight.index_copy_(0, target, torch.where(mask.unsqueeze(1), values, weight[fallback]))
        for name, per in plan.states:
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
