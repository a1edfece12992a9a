"""``EmbeddingCollectionSharder`` and the ``ShardedEmbeddingCollection`` it makes: the unpooled
collection, one row per id, sharded as the bag collection is.

One step, on every rank: the input dist sends each rank the ids its shards serve, as for the
bag collection (``input_dist.py``); the local collection looks them up with one op call per
dtype; ``comm.RowsOutputDist`` sends every row back to the rank the id came from, where the
awaitable puts each feature's rows back in the KJT's order: column blocks side by side, row
blocks un-bucketized, a replica's own rows as they are. Tables split into column blocks under
a fused optimizer that reads whole rows are looked up by a second local collection and stepped
exactly in the backward, as the bag collection's are (``exact_columns.py``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from jaggedrec.modules.embedding_modules import EmbeddingCollection
from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, as_keyed_jagged_tensor
from jaggedrec.optim import FusedOptimizer
from jaggedrec.distributed.comm import Pending, rows_output_dist
from jaggedrec.distributed.exact_columns import ExactColumns
from jaggedrec.distributed.input_dist import InputDist, Routing
from jaggedrec.distributed.shard_layout import REPLICA, ShardLayout
from jaggedrec.distributed.shards import CollectionSharder, ShardedCollection, build_local_collection, check_env
from jaggedrec.distributed.types import Awaitable, EmbeddingModuleShardingPlan, LazyAwaitable, ShardingEnv


class EmbeddingCollectionAwaitable(LazyAwaitable[Dict[str, JaggedTensor]]):
    """The output of a sharded forward: ``wait()`` (or any use as the dict) completes the
    output dist and returns this rank's ``Dict[str, JaggedTensor]``, as the unsharded module's."""

    def __init__(self, assemble: Callable[..., Dict[str, JaggedTensor]], pending: Pending, received: torch.Tensor,
                 own: torch.Tensor, step: "_Step") -> None:
        super().__init__()
        self._assemble, self._pending, self._parts, self._step = assemble, pending, (received, own), step

    def _wait_impl(self) -> Dict[str, JaggedTensor]:
        self._pending.wait()
        return self._assemble(*self._parts, self._step)


class _Step:
    """What the way back needs of one step's way out."""

    def __init__(self, routing: Routing, own_lengths: Dict[str, torch.Tensor], ids: Dict[str, torch.Tensor]) -> None:
        self.routing, self.own_lengths, self.ids = routing, own_lengths, ids


class ShardedEmbeddingCollection(ShardedCollection):
    """An ``EmbeddingCollection`` sharded over the ranks of ``env`` by ``plan``.

    ``forward(kjt)`` takes this rank's KJT (``B`` samples per feature, the same ``B`` on every
    rank in a step; jaggedrec's or TorchRec's, whose tensors it uses as they are) and returns
    an ``EmbeddingCollectionAwaitable`` of the dict the unsharded module gives for these
    samples: per feature, ``[N_f, dim]`` rows in the table's dtype.
    """

    def __init__(self, module: EmbeddingCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: Optional[torch.device] = None, fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        super().__init__()
        device = check_env(type(self).__name__, env, device, module)
        self._env, self._group, self._plan = env, env.process_group, plan
        rank = env.rank
        self._fused = fused = fused_optimizer if fused_optimizer is not None else module.fused_optimizer
        whole_rows = fused is not None and fused.needs_whole_rows
        self._layout = layout = ShardLayout(module.embedding_configs(), plan, env.world_size, whole_rows)
        local = build_local_collection(module, layout, rank, device, fused, layout.other_shards(rank),
                                       exact_columns=True, need_indices=False)
        self._lookups = nn.ModuleList([local] if local is not None else [])
        # the tables split into column blocks under fused: a collection of their own, stepped
        # by self._exact in the backward (see exact_columns.py)
        self._exact_lookup = build_local_collection(module, layout, rank, device, fused, layout.exact_shards(rank),
                                                    exact_columns=True, need_indices=False)
        if self._exact_lookup is not None:  # looked up only: ExactColumns steps it
            self._exact_lookup.fused_optimizer_state.backward_trigger.requires_grad_(False)
        self._exact = (ExactColumns(layout, rank, self._exact_lookup, fused, self._group, device, pooled=False)
                       if layout.exact_tables else None)
        self._input_dists = nn.ModuleList([InputDist(layout, rank, self._group, module.feature_spec, False)])
        self._embedding_names = list(module.layout.embedding_names)
        self._need_indices = module.need_indices()
        self._device = device
        kinds = [layout.table_kind(t) for t in range(len(layout.configs))]
        self._kinds = (any(k != REPLICA for k in kinds), any(k == REPLICA for k in kinds))
        self._init_state_dict(layout, rank, local, fused, self._group, device, self._exact_lookup)

    # --- forward -------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor) -> EmbeddingCollectionAwaitable:
        features = as_keyed_jagged_tensor(features)
        taken = self._take_input(features)
        if isinstance(taken, Awaitable):  # a semi-sync pipeline's lookup, done a step ahead
            return taken
        local_kjt, b, own_lengths, routing = taken.wait()
        layout, rank, world = self._layout, self._env.rank, self._env.world_size
        mine = layout.local_features[rank]
        # per local feature j and source rank s: the rows of s's ids, [n_js, cols_j]
        blocks: List[List[torch.Tensor]] = []
        joined: List[torch.Tensor] = []
        if self._exact is not None:  # the exact tables' keys come first (see ShardLayout)
            exact_kjt, local_kjt = local_kjt.split([self._exact.num_keys, len(local_kjt.keys()) - self._exact.num_keys])
            blocks, attached = self._exact_blocks(exact_kjt, world, b)
            # the exact step must run on every rank: its node joins the output dist's input,
            # even with no rows (see exact_columns.py)
            joined = [attached[:0]]
        if self._lookups:
            rows = self._lookups[0](local_kjt)
            keys = local_kjt.keys()
            counts = local_kjt.lengths().view(len(keys), world, b).sum(-1).tolist()
            blocks += [list(torch.split(rows[key].values(), counts[j])) for j, key in enumerate(keys)]
        exchanged = [j for j, (_, _, s) in enumerate(mine) if s.kind != REPLICA]
        replicas = [j for j, (_, _, s) in enumerate(mine) if s.kind == REPLICA]
        sent = _flat(joined + [blocks[j][s] for s in range(world) for j in exchanged], self._device)
        replica = _flat([blocks[j][s] for s in range(world) for j in replicas], self._device)
        send_splits = [sum(blocks[j][s].numel() for j in exchanged) for s in range(world)]
        replica_splits = [sum(blocks[j][s].numel() for j in replicas) for s in range(world)]
        recv_splits = [sum(n * s.cols for n, (_, _, s) in zip(routing.id_counts[r], layout.local_features[r])
                           if s.kind != REPLICA) for r in range(world)]
        pending = Pending(taken.check)
        received, own = rows_output_dist(sent, replica, send_splits, recv_splits, replica_splits, self._kinds,
                                         self._group, pending)
        ids = {}
        if self._need_indices:
            index, starts, counts = features.index_per_key(), features.offset_per_key(), features.length_per_key()
            ids = {key: features.values().narrow(0, starts[index[key]], counts[index[key]])
                   for key in layout.keys_needed()}
        return EmbeddingCollectionAwaitable(self._assemble, pending, received, own, _Step(routing, own_lengths, ids))

    def _exact_blocks(self, kjt: KeyedJaggedTensor, world: int, b: int):
        """The exact collection's rows of ``kjt`` (its keys, every rank's ids) as the forward's
        blocks (per key and source rank, ``[n, cols]`` fp32), cut from one flat tensor that
        carries the exact step (returned too)."""
        keys, n = kjt.keys(), kjt.length_per_key()
        with torch.no_grad():  # the exact step writes the rows read here (see ExactColumns.attach)
            rows = self._exact_lookup(kjt) if self._exact_lookup is not None else {}
            flat = _flat([rows[key].values() for key in keys], self._device)
        attached = self._exact.attach(flat, kjt, None)
        shards = [s for _, _, s in self._layout.local_features[self._env.rank][:len(keys)]]
        counts = kjt.lengths().view(len(keys), world, b).sum(-1).tolist()
        per_key = torch.split(attached, [k * s.cols for k, s in zip(n, shards)])
        blocks = []
        for p, k, s, c in zip(per_key, n, shards, counts):
            rows = p.view(k, s.cols)
            dtype = self._layout.configs[s.table].data_type.to_torch()
            if dtype != torch.float32:  # the gradient in the table's dtype, as the other shards' (and one module's)
                rows = rows.to(dtype).float()
            blocks.append(list(torch.split(rows, c)))
        return blocks, attached

    def _assemble(self, received: torch.Tensor, own: torch.Tensor, step: _Step) -> Dict[str, JaggedTensor]:
        """Each feature's rows in its KJT order, from the blocks its shards sent back."""
        layout, world = self._layout, self._env.world_size
        pieces: Dict[tuple, list] = {}  # (table, key) -> [(shard, [n, cols] rows)]
        at = 0
        for r in range(world):
            for n, (_, key, s) in zip(step.routing.id_counts[r], layout.local_features[r]):
                if s.kind != REPLICA:
                    pieces.setdefault((s.table, key), []).append((s, received.narrow(0, at, n * s.cols).view(n, s.cols)))
                    at += n * s.cols
        at = 0
        for _, key, s in layout.local_features[self._env.rank]:
            if s.kind == REPLICA:
                n = int(step.own_lengths[key].sum())
                pieces[(s.table, key)] = [(s, own.narrow(0, at, n * s.cols).view(n, s.cols))]
                at += n * s.cols
        out: Dict[str, JaggedTensor] = {}
        for name, (t, key) in zip(self._embedding_names, layout.output_features):
            config = layout.configs[t]
            lengths = step.own_lengths[key]
            parts = sorted(pieces.get((t, key), []), key=lambda p: (p[0].col_offset, p[0].row_offset))
            if not parts:  # every shard of the table is empty: the table has no rows
                values = torch.zeros(0, config.embedding_dim, device=self._device)
            elif parts[0][0].row_split:
                values = torch.cat([rows for _, rows in parts])
                order = step.routing.orders[(t, key)].to(values.device)
                values = values.index_select(0, torch.argsort(order))
            else:
                values = torch.cat([rows for _, rows in parts], 1)
            out[name] = JaggedTensor(values.to(config.data_type.to_torch()), lengths=lengths,
                                     weights=step.ids.get(key) if self._need_indices else None)
        return out

    def embedding_configs(self):
        return list(self._layout.configs)


class EmbeddingCollectionSharder(CollectionSharder):
    """Shards ``EmbeddingCollection``s into ``ShardedEmbeddingCollection``s (TorchRec's name);
    ``fused_params`` as for the bag collection's sharder."""

    module_type = EmbeddingCollection
    sharded_type = ShardedEmbeddingCollection
    exact_columns = True


def _flat(blocks: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Row blocks as one flat fp32 buffer (a collective takes one dtype; fp16 and bf16 rows
    come back exactly)."""
    if not blocks:
        return torch.zeros(0, device=device)
    return torch.cat([b.reshape(-1).float() for b in blocks])
