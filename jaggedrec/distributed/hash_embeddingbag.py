"""``HashEmbeddingBagCollectionSharder`` and the ``ShardedHashEmbeddingBagCollection`` it makes.

A ``HashEmbeddingBagCollection`` is sharded as two parts under one plan:

- its hashed tables' id maps, as a ``ManagedCollisionCollection`` of ``hash_buckets.HashBucketModule``
  (one per table) sharded by ``mc_modules.ShardedManagedCollisionCollection``: bucket ``k`` of a
  table, with its slots' ids, last steps and counts, lives on the rank holding the bucket's
  first row, and a rank's consecutive buckets of a table are one module (hundreds or thousands
  of buckets cost one module and one remap a rank); the owners remap the global batch's ids of
  their buckets;
- its tables, hashed and static, as an ``EmbeddingBagCollection`` sharded by the bag
  collection's own sharder (fused optimizer, input and output dists, checkpoint as always).

A step: the hashed features' raw ids are remapped on their buckets' owners (every rank joins
the collectives, with or without ids or buckets; a bad batch raises on every rank); the rows
whose ids were evicted go to the ranks holding them (an all-to-all of counts and one of rows),
which re-initialise them and zero their fused state, as the unsharded module does, before the
remapped KJT (static features as they came) is looked up. Hashed tables shard table-wise or
row-wise; the row blocks need not be made of whole buckets.

Ids that found no slot and ids that read the fallback row are counted per hashed feature on the
rank whose batch held them (the owners mark them in the rows they send back: no collective of
its own, no sync); ``unplaced_counts(all_ranks=True)`` sums them over the world. Collectives take
tensors on the module's device (gloo: CPU; NCCL: the rank's GPU); only the all-to-all splits
are read on the host, as every uneven all-to-all needs them.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from jaggedrec.distributed.comm import exchange
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.hash_buckets import HashBucketModule
from jaggedrec.distributed.mc_modules import ShardedManagedCollisionCollection
from jaggedrec.distributed.shard_layout import ShardLayout
from jaggedrec.distributed.shards import CollectionSharder
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ShardingEnv, ShardingType
from jaggedrec.modules.embedding_modules import EmbeddingBagCollection
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, reset_rows
from jaggedrec.modules.mc_modules import ManagedCollisionCollection
from jaggedrec.optim import FusedOptimizer
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, as_keyed_jagged_tensor

_OWNER = "ShardedHashEmbeddingBagCollection"
_HASHED_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value)


def _id_maps(module: HashEmbeddingBagCollection) -> ManagedCollisionCollection:
    """The hashed tables' id maps as a managed-collision collection (on the module's device,
    holding the module's state: a trained module shards with its ids)."""
    state = module.hash_state
    configs = {c.name: c for c in module.embedding_bag_configs()}
    lfu = any(t.options.eviction == "lfu" for t in state.tables)
    modules, hashed = {}, []
    for h, t in enumerate(state.tables):
        span = (t.num_embeddings - 1) // t.options.bucket_size
        whole = HashBucketModule(t.name, t.num_embeddings, t.options, 0, state.keys.device, span, lfu)
        segments = whole.bucket_segments()
        base = state.slot_base(h)
        for name in ("keys", "last_step", "count"):
            getattr(whole, name).copy_(getattr(state, name).narrow(0, base, segments[-1]))
        whole.step.copy_(state.step)
        if whole.shared_width():
            base = int(state.column("sketch_base")[h])
            whole.sketch.copy_(state.sketch.narrow(0, base, whole.shared_width()))
        modules[t.name] = whole
        hashed.append(configs[t.name])
    return ManagedCollisionCollection(modules, hashed)


def _plain(module: HashEmbeddingBagCollection) -> EmbeddingBagCollection:
    """The module's tables as a plain bag collection (same configs, settings and weights)."""
    options = module.options
    plain = EmbeddingBagCollection(module.embedding_bag_configs(), is_weighted=module.is_weighted(),
                                   device=module.device, backend=options.backend, sparse=options.sparse,
                                   validate=options.validate, bounds_check=options.bounds_check,
                                   deterministic=options.deterministic, fused_optimizer=options.fused_optimizer)
    with torch.no_grad():
        for t in range(len(module.embedding_bag_configs())):
            plain.table_weight(t).copy_(module.table_weight(t))
    return plain


class ShardedHashEmbeddingBagCollection(nn.Module):
    """A ``HashEmbeddingBagCollection`` sharded over the ranks of ``env``: ``forward(kjt)`` takes
    this rank's KJT (``B`` bags per key, the same ``B`` on every rank) and returns the sharded
    bag collection's awaitable of the ``[B, sum(dims)]`` KeyedTensor the unsharded module gives
    for these bags."""

    def __init__(self, module: HashEmbeddingBagCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 embedding_sharder: CollectionSharder, device: Optional[torch.device] = None) -> None:
        super().__init__()
        configs = module.embedding_bag_configs()
        hashed = set(module.hashed_tables())
        for t in module.hash_state.tables:
            p = plan[t.name] if t.name in plan else None
            if p is not None and p.sharding_type not in _HASHED_TYPES:
                raise ValueError(f"{_OWNER}: hash table '{t.name}' is {p.sharding_type}; a hashed table shards "
                                 f"table-wise or row-wise")
        self._embedding_module = embedding_sharder.shard(_plain(module), plan, env, device)
        self._managed_collision_collection = ShardedManagedCollisionCollection(_id_maps(module), plan, env, device)
        self._env, self._group = env, env.process_group
        fused = embedding_sharder.fused_optimizer or module.options.fused_optimizer
        layout = ShardLayout(configs, plan, env.world_size, fused is not None and fused.needs_whole_rows)
        # where each hashed table's rows live: [(first row, rows, rank, local table or -1)]
        mine = {(s.table, s.row_offset): i for i, s in enumerate(layout.other_shards(env.rank))}
        self._blocks: Dict[int, List[tuple]] = {}
        for t, c in enumerate(configs):
            if c.name in hashed:
                blocks = {(s.row_offset, s.rows, s.rank) for r in range(env.world_size) for s in layout.shards[r]
                          if s.table == t}
                self._blocks[t] = sorted((row, rows, rank, mine.get((t, row), -1) if rank == env.rank else -1)
                                         for row, rows, rank in blocks)
        self._table_index = {c.name: t for t, c in enumerate(configs)}
        self._hashed_features = [f for c in configs if c.name in hashed for f in c.feature_names]
        self._static_features = [f for c in configs if c.name not in hashed for f in c.feature_names]
        self._plan = plan

    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def managed_collision_collection(self) -> ShardedManagedCollisionCollection:
        return self._managed_collision_collection

    @property
    def embedding_module(self) -> nn.Module:
        return self._embedding_module

    def embedding_bag_configs(self):
        return self._embedding_module.embedding_bag_configs()

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """This rank's KJT with the hashed features' ids replaced by their rows (training: placed
        and evicted on the owners, the evicted rows re-initialised where they live); a
        collective step every rank joins. Keys: the hashed features, then the static ones."""
        features = as_keyed_jagged_tensor(features)
        remapped = self._managed_collision_collection(features)
        self._reset_evicted(self._managed_collision_collection.evict())
        if not self._static_features:
            return remapped
        index, starts, counts = features.index_per_key(), features.offset_per_key(), features.length_per_key()
        b = features.stride()
        values, lengths = features.values(), features.lengths()
        static_values = [values.narrow(0, starts[index[f]], counts[index[f]]) for f in self._static_features]
        static_lengths = [lengths.narrow(0, index[f] * b, b) for f in self._static_features]
        weights = None
        if features.weights_or_none() is not None:
            w = features.weights()
            weights = torch.cat([remapped.weights()] + [w.narrow(0, starts[index[f]], counts[index[f]])
                                                        for f in self._static_features])
        return KeyedJaggedTensor(self._hashed_features + self._static_features,
                                 torch.cat([remapped.values().to(values.dtype)] + static_values), weights,
                                 lengths=torch.cat([remapped.lengths()] + static_lengths), stride=b)

    def forward(self, features: KeyedJaggedTensor):
        return self._embedding_module(self.remap(features))

    def unplaced_counts(self, all_ranks: bool = False) -> Dict[str, torch.Tensor]:
        """Per hashed feature, ``[]`` int64 on the device: admitted ids that found no slot,
        summed over batches. Default: this rank's ids, read with no sync and no collective;
        ``all_ranks=True``: the world's (the unsharded module's count), by one all-reduce that
        every rank must call at the same point."""
        return self._summed(self._managed_collision_collection.unplaced_counts(), all_ranks)

    def fallback_counts(self, all_ranks: bool = False) -> Dict[str, torch.Tensor]:
        """As :meth:`unplaced_counts`, for ids that read the fallback row (unplaced, not
        admitted yet, or absent in eval)."""
        return self._summed(self._managed_collision_collection.fallback_counts(), all_ranks)

    def _summed(self, counts: Dict[str, torch.Tensor], all_ranks: bool) -> Dict[str, torch.Tensor]:
        if not all_ranks or self._env.world_size == 1 or not counts:
            return counts
        total = torch.stack(list(counts.values()))
        torch.distributed.all_reduce(total, group=self._group)
        return dict(zip(counts, total.unbind()))

    def _reset_evicted(self, evicted: Dict[str, Optional[torch.Tensor]]) -> None:
        """Send each evicted row (global) to the rank holding it, which re-initialises it."""
        world = self._env.world_size
        per_rank: List[List[torch.Tensor]] = [[] for _ in range(world)]
        for name, rows in evicted.items():
            if rows is None or rows.numel() == 0:
                continue
            t = self._table_index[name]
            for first, n, rank, _ in self._blocks[t]:
                pick = rows[(rows >= first) & (rows < first + n)]
                if pick.numel():
                    per_rank[rank].append(torch.stack([torch.full_like(pick, t), pick], 1))
        device = self._embedding_module.device
        sends = [torch.cat(p) if p else torch.zeros(0, 2, dtype=torch.int64, device=device) for p in per_rank]
        counts = [s.shape[0] for s in sends]
        if world > 1:
            (got_counts,) = exchange([(torch.tensor(counts, dtype=torch.int64, device=device), [1] * world,
                                       [1] * world)], self._group)
            recv = got_counts.tolist()
            (got,) = exchange([(torch.cat(sends), counts, recv)], self._group)
        else:
            got = sends[0]
        if got.numel() == 0:
            return
        local = self._embedding_module.local_collection()
        for t, blocks in self._blocks.items():
            for first, n, rank, i in blocks:
                if i < 0:
                    continue
                rows = got[(got[:, 0] == t) & (got[:, 1] >= first) & (got[:, 1] < first + n), 1]
                reset_rows(local, i, torch.unique(rows) - first)


class HashEmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``HashEmbeddingBagCollection``s: the tables by ``ebc_sharder`` (default: an
    ``EmbeddingBagCollectionSharder`` with ``fused_params``), the hashed tables' id maps by
    bucket, one plan for both. Hashed tables: table-wise or row-wise."""

    module_type = HashEmbeddingBagCollection
    sharded_type = ShardedHashEmbeddingBagCollection

    def __init__(self, ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
                 fused_params: Optional[dict] = None, qcomm_codecs_registry: Optional[dict] = None) -> None:
        self._ebc_sharder = ebc_sharder or EmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry)
        super().__init__(self._ebc_sharder.fused_params, qcomm_codecs_registry)

    def shard(self, module: nn.Module, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        if not isinstance(module, HashEmbeddingBagCollection):
            raise TypeError(f"{type(self).__name__} shards jaggedrec's HashEmbeddingBagCollection, got "
                            f"{type(module).__name__}")
        return ShardedHashEmbeddingBagCollection(module, params, env, self._ebc_sharder, device)

    def shard_optimizer(self, module: nn.Module) -> Optional[FusedOptimizer]:
        return self._ebc_sharder.shard_optimizer(module)

    def shardable_parameters(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        return self._ebc_sharder.shardable_parameters(module)

    def compute_kernels(self, sharding_type: str, compute_device_type: str):
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(_HASHED_TYPES)

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._ebc_sharder.fused_optimizer
