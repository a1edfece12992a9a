"""``ManagedCollisionCollectionSharder`` and the ``ShardedManagedCollisionCollection`` it makes,
at TorchRec's path.

A managed-collision table is cut into the buckets its module keeps apart (``buckets()``,
``bucket_segments()``: fixed row ranges, the same under every plan); bucket ``k`` lives, with
its id map and eviction metadata, on the rank that holds the embedding rows where the bucket
starts (table-wise: the table's rank; row-wise: the rank of that row block). So a row-wise
table whose row blocks are unions of whole buckets is remapped where it is looked up, and a
checkpoint moves whole buckets between plans and world sizes without changing any id's row.

One step, on every rank (each of them a collective every rank enters, whatever it holds):

1. the source rank runs ``preprocess``, finds each id's bucket (``bucket_of``) and agrees
   with the others on the step (``comm.start_agree``: a rank with a bad batch makes every
   rank raise);
2. the ids go to the ranks owning their buckets (one all-to-all of per-bucket counts, one of
   ids), which ``profile`` and ``remap`` them, bucket by bucket, with the global batch's ids of
   the bucket in the unsharded order (feature by feature, source rank by source rank);
3. a second agreement carries any owner's error (``unplaced="raise"``) to every rank;
4. the rows go back to the source, which puts them in its KJT's order.

A module plugs in by implementing, beside TorchRec's contract, ``bucket_segments()``,
``bucket_of(ids)`` and ``row_state_names()`` (``MCHManagedCollisionModule`` and
``HashZchManagedCollisionModule`` do).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata as TorchShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as TorchShard
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from jaggedrec.modules.mc_modules import ManagedCollisionCollection
from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, as_keyed_jagged_tensor
from jaggedrec.distributed.comm import exchange, start_agree
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ShardingEnv, ShardingType

_OWNER = "ShardedManagedCollisionCollection"
_MODULES = "_managed_collision_modules"  # TorchRec's state_dict prefix (the unsharded module's)
_SEGMENTS = "_output_segments_tensor"


class BucketLayout:
    """Which rank holds each bucket of each table under one plan: pure Python, the same on
    every rank. ``segments[t]``: the ``K + 1`` row edges of table ``t``'s buckets;
    ``owners[t][k]``: the rank of bucket ``k``; ``slots[r]``: ``(table, bucket, feature)`` in the
    order rank ``r`` receives ids (its buckets in table order, each bucket's features in order)."""

    def __init__(self, configs, segments: List[List[int]], plan: EmbeddingModuleShardingPlan, world_size: int) -> None:
        self.names = [c.name for c in configs]
        self.features = [list(c.feature_names) for c in configs]
        self.segments: List[List[int]] = []
        self.owners: List[List[int]] = []
        for c, edges in zip(configs, segments):
            if c.name not in plan:
                raise ValueError(f"{_OWNER}: the sharding plan has no entry for table '{c.name}'")
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"{_OWNER}: table '{c.name}' has an empty bucket (row edges {edges}); give it "
                                 f"fewer buckets than rows")
            self.segments.append(list(edges))
            self.owners.append([_owner_of(c.name, plan[c.name], start - edges[0], world_size)
                                for start in edges[:-1]])
        self.slots: List[List[Tuple[int, int, int]]] = [[] for _ in range(world_size)]
        for t, owners in enumerate(self.owners):
            for k, r in enumerate(owners):
                self.slots[r].extend((t, k, f) for f in range(len(self.features[t])))
        starts = [0]
        for slots in self.slots:
            starts.append(starts[-1] + len(slots))
        self.slot_starts = starts
        index = {slot: starts[r] + i for r, slots in enumerate(self.slots) for i, slot in enumerate(slots)}
        # per table, [K, F] -> the slot's global number (ranks' slots one after another)
        self.slot_index = [torch.tensor([[index[(t, k, f)] for f in range(len(self.features[t]))]
                                         for k in range(len(self.owners[t]))], dtype=torch.int64)
                           for t in range(len(configs))]

    def buckets_of(self, rank: int) -> List[Tuple[int, int]]:
        """``(table, bucket)`` held by ``rank``, in its slots' order."""
        return list(dict.fromkeys((t, k) for t, k, _ in self.slots[rank]))


def _owner_of(name: str, p, row: int, world_size: int) -> int:
    """The rank holding row ``row`` of a table (the first column block's, for column shards)."""
    if p.sharding_type == ShardingType.DATA_PARALLEL.value:
        raise ValueError(f"{_OWNER}: table '{name}' is data_parallel; a managed-collision table keeps one id map, "
                         f"so shard it table-wise, row-wise or column-wise")
    for m in p.shards:
        (r0, _), (nr, nc) = m.shard_offsets, m.shard_sizes
        if nr > 0 and nc > 0 and r0 <= row < r0 + nr:
            if not 0 <= m.rank < world_size:
                raise ValueError(f"{_OWNER}: table '{name}' is placed on rank {m.rank}, outside the world of "
                                 f"{world_size} ranks")
            return m.rank
    raise ValueError(f"{_OWNER}: no shard of table '{name}' holds row {row}")


class ShardedManagedCollisionCollection(nn.Module):
    """A ``ManagedCollisionCollection`` sharded over the ranks of ``env`` by the plan of the
    embedding tables it serves.

    ``forward(kjt)`` takes this rank's KJT (``B`` bags per feature, the same ``B`` on every
    rank) and returns the KJT of rows the unsharded collection gives for these bags (the
    configs' features in order, lengths and weights kept), computed by the buckets' owners.
    ``state_dict`` keys are the unsharded module's; the entries indexed by slot are
    ``ShardedTensor``s of this rank's buckets (``dcp.save`` / ``dcp.load`` move whole buckets).
    """

    def __init__(self, module: ManagedCollisionCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if env.process_group is None and env.world_size > 1:
            raise ValueError(f"{_OWNER}: sharding over several ranks needs a process group")
        whole = module.get_submodule(_MODULES)
        configs = list(module.embedding_configs())
        device = torch.device(device) if device is not None else torch.device("cpu")
        for c in configs:
            m = whole[c.name]
            if getattr(m, "disable_fallback", False):
                raise NotImplementedError(f"{_OWNER}: table '{c.name}': disable_fallback drops ids and changes the "
                                          f"bags' lengths, which the sharded collection does not send back")
        # the routers: each table's module rebuilt on meta (no memory), for preprocess and bucket_of
        meta = torch.device("meta")
        self._routers = [whole[c.name].rebuild_with_output_id_range(
            tuple(whole[c.name].bucket_segments()[:2]), whole[c.name].bucket_segments(), device=meta)
            for c in configs]
        self._env, self._group, self._device, self._plan = env, env.process_group, device, plan
        segments = [list(whole[c.name].bucket_segments()) for c in configs]
        self._layout = layout = BucketLayout(configs, segments, plan, env.world_size)
        self._configs = configs
        self._feature_names = [f for fs in layout.features for f in fs]
        self._local = layout.buckets_of(env.rank)
        modules = []
        for t, k in self._local:
            seg = layout.segments[t]
            modules.append(whole[configs[t].name].rebuild_with_output_id_range((seg[k], seg[k + 1]), seg,
                                                                               device=device))
        # TorchRec's attribute names, by which DistributedModelParallel knows a sharded module
        self._lookups = nn.ModuleList(modules)
        self._input_dists = nn.ModuleList()
        self.train(module.training)
        errors: List[str] = []
        self.load_entries(module.state_dict(), "", [], errors)
        if errors:
            raise ValueError(f"{_OWNER}: the module's state does not fit its buckets: {errors}")
        for m in self._lookups:
            m.validate_state()
        self.register_load_state_dict_pre_hook(_load_pre_hook)

    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def fused_optimizer(self):
        return None

    @property
    def bucket_layout(self) -> BucketLayout:
        return self._layout

    def local_modules(self) -> Dict[Tuple[str, int], nn.Module]:
        """``(table, bucket)`` -> this rank's module of that bucket."""
        return {(self._layout.names[t], k): m for (t, k), m in zip(self._local, self._lookups)}

    def embedding_configs(self):
        return list(self._configs)

    def extra_repr(self) -> str:
        return f"world_size={self._env.world_size}, rank={self._env.rank}, buckets={len(self._local)}"

    # --- forward -------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True) -> KeyedJaggedTensor:
        """
        Args:
            features: this rank's KJT (``B`` bags per key; every feature of the tables).
        Returns:
            the KJT of the features in the configs' order, each id replaced by its row.
        """
        features = as_keyed_jagged_tensor(features)
        layout, world, group = self._layout, self._env.world_size, self._group
        n_slots = layout.slot_starts[-1]
        error: Optional[BaseException] = None
        batch_size, ids, per_slot, order, counts = -1, None, None, None, [0] * world
        try:
            batch_size = features.stride()
            values, lengths, ids, slot = self._route(features)
            order = torch.argsort(slot, stable=True)
            per_slot = torch.bincount(slot, minlength=n_slots)
            starts = layout.slot_starts
            counts = [int(per_slot[starts[r]:starts[r + 1]].sum()) for r in range(world)]
        except (ValueError, TypeError) as e:
            error = e
        device = features.values().device if error is None else self._device
        recv_counts = start_agree(error, batch_size, counts, group, device).wait(_OWNER)
        mine = len(layout.slots[self._env.rank])
        sizes = [layout.slot_starts[r + 1] - layout.slot_starts[r] for r in range(world)]
        got_slots, got_ids = exchange([(per_slot, sizes, [mine] * world), (ids[order], counts, recv_counts)], group)
        # owners: the ids of each bucket in the unsharded order, remapped
        owner_error: Optional[BaseException] = None
        rows = got_ids
        try:
            rows = self._remap_owned(got_slots.view(world, mine), got_ids)
        except (ValueError, TypeError, RuntimeError) as e:
            owner_error = e
        start_agree(owner_error, batch_size, recv_counts, group, device).wait(_OWNER)
        (back,) = exchange([(rows, recv_counts, counts)], group)
        remapped = torch.empty_like(back)
        remapped[order] = back
        return KeyedJaggedTensor(self._feature_names, remapped.to(values.dtype), features.weights_or_none()
                                 if list(features.keys()) == self._feature_names else self._weights(features),
                                 lengths=lengths, stride=batch_size)

    def _route(self, features: KeyedJaggedTensor):
        """This rank's ids after ``preprocess`` (``[N]`` int64, features in order) and each one's
        global slot (``[N]``), with the values and ``[F*B]`` lengths of the features in order."""
        keys = features.keys()
        missing = [f for f in self._feature_names if f not in keys]
        if missing:
            raise ValueError(f"{_OWNER}: features {missing} are not in the input (keys: {keys})")
        values = features.values()
        if values.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{_OWNER}: ids must be int32 or int64, got {values.dtype}")
        index, starts, counts = features.index_per_key(), features.offset_per_key(), features.length_per_key()
        b = features.stride()
        all_lengths = features.lengths().view(-1)
        ids, slots, lengths = [], [], []
        for t, names in enumerate(self._layout.features):
            router, name = self._routers[t], self._layout.names[t]
            parts = [values.narrow(0, starts[index[f]], counts[index[f]]) for f in names]
            lens = [all_lengths.narrow(0, index[f] * b, b) for f in names]
            table_ids = router.preprocess({name: JaggedTensor(values=torch.cat(parts), lengths=torch.cat(lens))})
            table_ids = table_ids[name].values().to(torch.int64)
            bucket = router.bucket_of(table_ids)
            n_buckets = len(self._layout.owners[t])
            bad = (bucket < 0) | (bucket >= n_buckets)
            feature = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([p.numel() for p in parts]))
            if bool(bad.any()):
                first = int(torch.nonzero(bad)[0])
                raise ValueError(f"{_OWNER}: feature '{names[int(feature[first])]}' (table '{name}') has id "
                                 f"{int(table_ids[first])}, outside [0, {router.input_size()}), the ids its "
                                 f"{n_buckets} buckets hold")
            slots.append(self._layout.slot_index[t].to(bucket.device)[bucket, feature.to(bucket.device)])
            ids.append(table_ids)
            lengths.extend(lens)
        if not ids:
            empty = values.new_zeros(0, dtype=torch.int64)
            return values, all_lengths.new_zeros(0), empty, empty
        return values, torch.cat(lengths), torch.cat(ids), torch.cat(slots)

    def _remap_owned(self, slot_counts: torch.Tensor, got_ids: torch.Tensor) -> torch.Tensor:
        """``[W, S]`` received counts per (source, slot) and the ids, source after source -> their
        rows in the same order, each of this rank's buckets profiled and remapped once."""
        world, mine = slot_counts.shape
        if mine == 0:
            self._share_profiles([])
            return got_ids
        sizes = slot_counts.reshape(-1)
        src_start = (torch.cumsum(sizes, 0) - sizes).view(world, mine)
        dst_sizes = slot_counts.t().reshape(-1)
        dst_start = torch.cumsum(dst_sizes, 0) - dst_sizes
        gather = (torch.repeat_interleave(src_start.t().reshape(-1) - dst_start, dst_sizes)
                  + torch.arange(got_ids.numel(), device=got_ids.device))
        by_slot = got_ids[gather]
        per_slot = slot_counts.sum(0).tolist()
        per_bucket: Dict[Tuple[int, int], int] = {}
        for t, k, _ in self._layout.slots[self._env.rank]:
            per_bucket[(t, k)] = per_bucket.get((t, k), 0) + per_slot.pop(0)
        pieces = torch.split(by_slot, [per_bucket[tk] for tk in self._local])
        profiled = []
        for (t, k), module, bucket_ids in zip(self._local, self._lookups, pieces):
            name = self._layout.names[t]
            jt = {name: JaggedTensor(values=bucket_ids, lengths=bucket_ids.new_tensor([bucket_ids.numel()]))}
            profiled.append(module.profile(jt))
        self._share_profiles(self._local)
        out = [module.remap(jt)[self._layout.names[t]].values().to(torch.int64)
               for (t, _), module, jt in zip(self._local, self._lookups, profiled)]
        rows = torch.empty_like(got_ids)
        rows[gather] = torch.cat(out) if out else got_ids
        return rows

    def _share_profiles(self, local) -> None:
        """Tables whose buckets share state across buckets (a module with ``shared_width()`` > 0:
        a hash table's admission counters) in training: each rank sums what its buckets profiled
        (``shared_increment()``), one all-reduce every rank joins gives the batch's total, and each
        bucket takes it (``take_shared(total)``) before ``remap``."""
        widths = [getattr(r, "shared_width", lambda: 0)() for r in self._routers]
        if not self.training or not any(widths):
            return
        parts = [torch.zeros(w, dtype=torch.int64, device=self._device) for w in widths]
        for (t, _), module in zip(local, self._lookups):
            if widths[t]:
                parts[t] += module.shared_increment()
        total = torch.cat(parts)
        if self._env.world_size > 1:
            torch.distributed.all_reduce(total, group=self._group)
        totals = torch.split(total, widths)
        for (t, _), module in zip(local, self._lookups):
            if widths[t]:
                module.take_shared(totals[t])

    def _weights(self, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
        weights = features.weights_or_none()
        if weights is None:
            return None
        index, starts, counts = features.index_per_key(), features.offset_per_key(), features.length_per_key()
        return torch.cat([weights.narrow(0, starts[index[f]], counts[index[f]]) for f in self._feature_names])

    # --- what the modules report ------------------------------------------------------------
    def evict(self) -> Dict[str, Optional[torch.Tensor]]:
        """Per table, the global rows of this rank's buckets whose ids were replaced since the
        last call (None when none were)."""
        out: Dict[str, Optional[torch.Tensor]] = {}
        for (t, _), m in zip(self._local, self._lookups):
            rows = m.evict()
            if rows is not None:
                name = self._layout.names[t]
                out[name] = rows if out.get(name) is None else torch.cat([out[name], rows])
        return {name: out.get(name) for name in self._layout.names}

    def open_slots(self) -> Dict[str, torch.Tensor]:
        """Per table, the free slots of this rank's buckets (``[1]``)."""
        out = {name: torch.zeros(1, dtype=torch.int64, device=self._device) for name in self._layout.names}
        for (t, _), m in zip(self._local, self._lookups):
            out[self._layout.names[t]] = out[self._layout.names[t]] + m.open_slots().to(self._device)
        return out

    # --- state_dict ---------------------------------------------------------------------------
    def _tables(self):
        """Per table: (name, router, its local ``[(bucket, module)]``)."""
        for t, name in enumerate(self._layout.names):
            local = [(k, m) for (tt, k), m in zip(self._local, self._lookups) if tt == t]
            yield t, name, self._routers[t], local

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The unsharded module's keys: slot-indexed entries as ``ShardedTensor``s (this rank's
        buckets' blocks, global metadata from the layout, so no collective), the rest (the
        iteration, the segments) plain, from this rank's first bucket of the table."""
        destination = destination if destination is not None else OrderedDict()
        for t, name, router, local in self._tables():
            base = f"{prefix}{_MODULES}.{name}."
            rows = set(router.row_state_names())
            for key, like in router.state_dict().items():
                if key in rows:
                    destination[base + key] = self._sharded(t, like, [(k, m.state_dict()[key]) for k, m in local])
                elif local:
                    destination[base + key] = local[0][1].state_dict()[key]
        return destination

    def _sharded(self, t: int, like: torch.Tensor, blocks) -> ShardedTensor:
        seg, owners = self._layout.segments[t], self._layout.owners[t]
        rest = list(like.shape[1:])
        metadata = [TorchShardMetadata([seg[k] - seg[0]] + [0] * len(rest), [seg[k + 1] - seg[k]] + rest,
                                       f"rank:{owners[k]}/{self._device.type}") for k in range(len(owners))]
        local = [TorchShard(tensor, metadata[k]) for k, tensor in blocks]
        size = torch.Size([seg[-1] - seg[0]] + rest)
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            local, ShardedTensorMetadata(metadata, size, TensorProperties(dtype=like.dtype)), process_group=self._group)

    @torch.no_grad()
    def load_entries(self, state_dict, prefix: str, missing_keys: List[str], error_msgs: List[str]) -> None:
        """Pop this module's keys from ``state_dict`` and copy this rank's buckets' blocks (from a
        ``ShardedTensor`` holding them, or a full tensor: an unsharded module's)."""
        for t, name, router, local in self._tables():
            base = f"{prefix}{_MODULES}.{name}."
            rows = set(router.row_state_names())
            seg = self._layout.segments[t]
            for key in router.state_dict():
                if base + key not in state_dict:
                    if local:
                        missing_keys.append(base + key)
                    continue
                value = state_dict.pop(base + key)
                if key == _SEGMENTS:  # the buckets are the module's, whatever the saved row blocks were
                    continue
                for k, m in local:
                    target = m.state_dict(keep_vars=True)[key].data
                    if key not in rows:
                        source = value
                    elif isinstance(value, ShardedTensor):
                        theirs = {s.metadata.shard_offsets[0]: s.tensor for s in value.local_shards()}
                        source = theirs.get(seg[k] - seg[0])
                        if source is None:
                            error_msgs.append(f"{base + key}: a ShardedTensor of another plan; load it with "
                                              f"torch.distributed.checkpoint (dcp.load into state_dict()), which "
                                              f"reshards")
                            continue
                    else:
                        source = value.narrow(0, seg[k] - seg[0], seg[k + 1] - seg[k])
                    if source.shape != target.shape:
                        error_msgs.append(f"{base + key}: shape {list(source.shape)} for the bucket's "
                                          f"{list(target.shape)}")
                    elif source.device.type == "meta":  # a module built on meta: its buckets start empty
                        continue
                    elif source.data_ptr() != target.data_ptr():
                        target.copy_(source.to(target.device))


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
    """Take the unsharded keys; the bucket modules then load their own tensors onto themselves
    (and re-validate: ``MCHManagedCollisionModule`` re-sorts its buffers)."""
    module.load_entries(state_dict, prefix, missing_keys, error_msgs)
    for key, value in nn.Module.state_dict(module, prefix=prefix).items():
        state_dict.setdefault(key, value)


class ManagedCollisionCollectionSharder(ModuleSharder[nn.Module]):
    """Shards ``ManagedCollisionCollection``s by the plan of the tables they serve."""

    module_type = ManagedCollisionCollection
    sharded_type = ShardedManagedCollisionCollection

    def shard(self, module: nn.Module, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        if not isinstance(module, ManagedCollisionCollection):
            raise TypeError(f"{type(self).__name__} shards jaggedrec's ManagedCollisionCollection, got "
                            f"{type(module).__name__}")
        return ShardedManagedCollisionCollection(module, params, env, device)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value,
                ShardingType.COLUMN_WISE.value]
