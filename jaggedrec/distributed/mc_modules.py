"""``ManagedCollisionCollectionSharder`` and the ``ShardedManagedCollisionCollection`` it makes,
at TorchRec's path.

A managed-collision table is cut into the buckets its module keeps apart (``buckets()``,
``bucket_segments()``: fixed row ranges, the same under every plan); bucket ``k`` lives, with
its id map and eviction metadata, on the rank that holds the embedding rows where the bucket
starts (table-wise: the table's rank; row-wise: the rank of that row block). So a row-wise
table whose row blocks are unions of whole buckets is remapped where it is looked up, and a
checkpoint moves whole buckets between plans and world sizes without changing any id's row.
A rank's consecutive buckets of a table form a run (``mc_layout.BucketLayout``): one module
per run where the module can hold one (``holds_bucket_runs()``), else one per bucket.

One step, on every rank (each of them a collective every rank enters, whatever it holds):

1. the source rank runs ``preprocess``, finds each id's bucket (``bucket_of``) and so its
   run's slot (one gather, whatever the bucket count), and agrees with the others on the step
   (``comm.start_agree``: a rank with a bad batch makes every rank raise);
2. the ids go to the ranks owning their runs (one all-to-all of per-slot counts, one of ids),
   which ``profile`` and ``remap`` them, run by run, with the global batch's ids of each bucket
   in the unsharded order (feature by feature, source rank by source rank);
3. a second agreement carries any owner's error (``unplaced="raise"``) to every rank;
4. the rows go back to the source, which puts them in its KJT's order; ids that found no slot
   come back marked, so the source counts them per feature (``unplaced_counts()``) with no
   collective of its own.

A module plugs in by implementing, beside TorchRec's contract, ``bucket_segments()``,
``bucket_of(ids)`` and ``row_state_names()`` (``MCHManagedCollisionModule`` and
``HashZchManagedCollisionModule`` do); optionally ``holds_bucket_runs()``, ``last_unplaced()``
(``[N]`` bool over its last remap's ids) and ``fallback_row()`` (``hash_buckets.HashBucketModule``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from jaggedrec.modules.mc_modules import ManagedCollisionCollection
from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, as_keyed_jagged_tensor, repeat_counts
from jaggedrec.distributed.comm import exchange, start_agree
from jaggedrec.distributed.mc_layout import BucketLayout
from jaggedrec.distributed.mc_state import MODULES, load_entries, load_pre_hook, state_entries
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ShardingEnv, ShardingType

_OWNER = "ShardedManagedCollisionCollection"


class ShardedManagedCollisionCollection(nn.Module):
    """A ``ManagedCollisionCollection`` sharded over the ranks of ``env`` by the plan of the
    embedding tables it serves.

    ``forward(kjt)`` takes this rank's KJT (``B`` bags per feature, the same ``B`` on every
    rank) and returns the KJT of rows the unsharded collection gives for these bags (the
    configs' features in order, lengths and weights kept), computed by the buckets' owners.
    ``state_dict`` keys are the unsharded module's; the entries indexed by slot are
    ``ShardedTensor``s of this rank's runs of buckets (``dcp.save`` / ``dcp.load`` reshard them).
    """

    def __init__(self, module: ManagedCollisionCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if env.process_group is None and env.world_size > 1:
            raise ValueError(f"{_OWNER}: sharding over several ranks needs a process group")
        whole = module.get_submodule(MODULES)
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
        joins = [getattr(r, "holds_bucket_runs", lambda: False)() for r in self._routers]
        self._layout = layout = BucketLayout(configs, segments, plan, env.world_size, joins)
        self._configs = configs
        self._feature_names = [f for fs in layout.features for f in fs]
        self._local = layout.runs_of(env.rank)
        modules = [whole[configs[t].name].rebuild_with_output_id_range(layout.run_rows(t, j), layout.segments[t],
                                                                       device=device) for t, j in self._local]
        # TorchRec's attribute names, by which DistributedModelParallel knows a sharded module
        self._lookups = nn.ModuleList(modules)
        self._input_dists = nn.ModuleList()
        # per feature of the tables with a fallback row: this rank's ids that found no slot
        # (owners mark them in the rows they send back) and that read the fallback row
        counted = [f for t, fs in enumerate(layout.features) for f in fs if hasattr(self._routers[t], "fallback_row")]
        self._counted = counted
        self.register_buffer("unplaced", torch.zeros(len(counted), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("fallback", torch.zeros(len(counted), dtype=torch.int64, device=device),
                             persistent=False)
        self._device_maps: Dict[str, tuple] = {}
        self.train(module.training)
        errors: List[str] = []
        load_entries(self, module.state_dict(), "", [], errors)
        if errors:
            raise ValueError(f"{_OWNER}: the module's state does not fit its buckets: {errors}")
        for m in self._lookups:
            m.validate_state()
        self.register_load_state_dict_pre_hook(load_pre_hook)

    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def fused_optimizer(self):
        return None

    @property
    def bucket_layout(self) -> BucketLayout:
        return self._layout

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def process_group(self):
        return self._group

    @property
    def rank(self) -> int:
        return self._env.rank

    def routers(self) -> List[nn.Module]:
        """Per table, its module rebuilt on meta (the unsharded state_dict's keys and row entries)."""
        return list(self._routers)

    def local_runs(self) -> List[Tuple[int, int, nn.Module]]:
        """``(table, run, module)`` of each run of buckets this rank holds (``bucket_layout.runs``)."""
        return [(t, j, m) for (t, j), m in zip(self._local, self._lookups)]

    def local_modules(self) -> Dict[Tuple[str, int], nn.Module]:
        """``(table, first bucket)`` -> this rank's module of the run of buckets starting there."""
        return {(self._layout.names[t], self._layout.runs[t][j][0]): m for t, j, m in self.local_runs()}

    def embedding_configs(self):
        return list(self._configs)

    def extra_repr(self) -> str:
        buckets = sum(self._layout.runs[t][j][1] for t, j in self._local)
        return f"world_size={self._env.world_size}, rank={self._env.rank}, buckets={buckets}, runs={len(self._local)}"

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
        error: Optional[BaseException] = None
        batch_size, ids, per_slot, order, counts, sizes = -1, None, None, None, [0] * world, []
        try:
            batch_size = features.stride()
            values, lengths, ids, slot, sizes = self._route(features)
            order = torch.argsort(slot, stable=True)
            per_slot = torch.bincount(slot, minlength=layout.slot_starts[-1])
            rank_of = self._on(per_slot.device)[1]
            counts = torch.zeros(world, dtype=torch.int64, device=per_slot.device).index_add_(
                0, rank_of, per_slot).tolist()
        except (ValueError, TypeError) as e:
            error = e
        device = features.values().device if error is None else self._device
        recv_counts = start_agree(error, batch_size, counts, group, device).wait(_OWNER)
        mine = len(layout.slots[self._env.rank])
        slot_sizes = [layout.slot_starts[r + 1] - layout.slot_starts[r] for r in range(world)]
        got_slots, got_ids = exchange([(per_slot, slot_sizes, [mine] * world), (ids[order], counts, recv_counts)],
                                      group)
        # owners: each run's ids (a bucket's in the unsharded order), remapped
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
        remapped = self._count(remapped, sizes)
        return KeyedJaggedTensor(self._feature_names, remapped.to(values.dtype), features.weights_or_none()
                                 if list(features.keys()) == self._feature_names else self._weights(features),
                                 lengths=lengths, stride=batch_size)

    def _route(self, features: KeyedJaggedTensor):
        """This rank's ids after ``preprocess`` (``[N]`` int64, features in order) and each one's
        global slot (``[N]``), with the values, ``[F*B]`` lengths of the features in order and the
        ids per feature (host ints, from the KJT's own offsets)."""
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
        device = values.device
        slot_index = self._on(device)[0]
        ids, slots, lengths, sizes, bad, features_of = [], [], [], [], [], []
        for t, names in enumerate(self._layout.features):
            router, name = self._routers[t], self._layout.names[t]
            parts = [values.narrow(0, starts[index[f]], counts[index[f]]) for f in names]
            lens = [all_lengths.narrow(0, index[f] * b, b) for f in names]
            table_ids = router.preprocess({name: JaggedTensor(values=torch.cat(parts), lengths=torch.cat(lens))})
            table_ids = table_ids[name].values().to(torch.int64)
            bucket = router.bucket_of(table_ids)
            n_buckets = len(self._layout.owners[t])
            part_sizes = [p.numel() for p in parts]
            feature = repeat_counts(torch.arange(len(names), device=device),
                                    torch.tensor(part_sizes, dtype=torch.int64, device=device),
                                    output_size=table_ids.numel())
            bad.append((bucket < 0) | (bucket >= n_buckets))
            slots.append(slot_index[t][bucket.clamp(0, n_buckets - 1), feature])  # bad ids raise below
            ids.append(table_ids)
            lengths.extend(lens)
            sizes.extend(part_sizes)
            features_of.append(feature)
        if bad and bool(torch.cat(bad).any()):  # one host read for every table
            t = next(t for t, flags in enumerate(bad) if bool(flags.any()))
            first, names = int(torch.nonzero(bad[t])[0]), self._layout.features[t]
            raise ValueError(f"{_OWNER}: feature '{names[int(features_of[t][first])]}' (table "
                             f"'{self._layout.names[t]}') has id {int(ids[t][first])}, outside "
                             f"[0, {self._routers[t].input_size()}), the ids its {len(self._layout.owners[t])} "
                             f"buckets hold")
        if not ids:
            empty = values.new_zeros(0, dtype=torch.int64)
            return values, all_lengths.new_zeros(0), empty, empty, sizes
        return values, torch.cat(lengths), torch.cat(ids), torch.cat(slots), sizes

    def _on(self, device: torch.device) -> tuple:
        """The layout's routing tensors on ``device`` (one host-to-device copy per device):
        ``slot_index`` per table, ``[S]`` rank of each slot, ``[C]`` counted features' positions,
        ``[F]`` each feature's fallback row (-1: not counted)."""
        maps = self._device_maps.get(str(device))
        if maps is None:
            layout = self._layout
            counted = [i for i, f in enumerate(self._feature_names) if f in self._counted]
            fallback = [self._routers[t].fallback_row() if f in self._counted else -1
                        for t, fs in enumerate(layout.features) for f in fs]
            maps = self._device_maps[str(device)] = (
                [s.to(device) for s in layout.slot_index], layout.slot_rank.to(device),
                torch.tensor(counted, dtype=torch.int64, device=device),
                torch.tensor(fallback, dtype=torch.int64, device=device))
        return maps

    def _remap_owned(self, slot_counts: torch.Tensor, got_ids: torch.Tensor) -> torch.Tensor:
        """``[W, S]`` received counts per (source, slot) and the ids, source after source -> their
        rows in the same order (ids that found no slot as ``-1 - row``), each of this rank's runs
        profiled and remapped once."""
        world, mine = slot_counts.shape
        if mine == 0:
            self._share_profiles()
            return got_ids
        sizes = slot_counts.reshape(-1)
        src_start = (torch.cumsum(sizes, 0) - sizes).view(world, mine)
        dst_sizes = slot_counts.t().reshape(-1)
        dst_start = torch.cumsum(dst_sizes, 0) - dst_sizes
        gather = (repeat_counts(src_start.t().reshape(-1) - dst_start, dst_sizes,
                                output_size=got_ids.numel())
                  + torch.arange(got_ids.numel(), device=got_ids.device))
        by_slot = got_ids[gather]
        per_slot = iter(torch.split(by_slot, slot_counts.sum(0).tolist()))
        inputs = []
        for t, _, module in self.local_runs():
            name, features = self._layout.names[t], self._layout.features[t]
            pieces = [next(per_slot) for _ in features]
            if getattr(module, "holds_bucket_runs", lambda: False)():
                inputs.append({f: JaggedTensor(values=p, lengths=p.new_tensor([p.numel()]))
                               for f, p in zip(features, pieces)})
            else:
                joined = torch.cat(pieces)
                inputs.append({name: JaggedTensor(values=joined, lengths=joined.new_tensor([joined.numel()]))})
        profiled = [module.profile(jt) for (_, _, module), jt in zip(self.local_runs(), inputs)]
        self._share_profiles()
        out = []
        for (_, _, module), jt in zip(self.local_runs(), profiled):
            run_rows = torch.cat([v.values().to(torch.int64) for v in module.remap(jt).values()])
            unplaced = getattr(module, "last_unplaced", lambda: None)()
            out.append(run_rows if unplaced is None else torch.where(unplaced, -1 - run_rows, run_rows))
        rows = torch.empty_like(got_ids)
        rows[gather] = torch.cat(out)
        return rows

    def _share_profiles(self) -> None:
        """Tables whose buckets share state across buckets (a module with ``shared_width()`` > 0:
        a hash table's admission counters) in training: each rank sums what its runs profiled
        (``shared_increment()``), one all-reduce every rank joins gives the batch's total, and each
        run takes it (``take_shared(total)``) before ``remap``."""
        widths = [getattr(r, "shared_width", lambda: 0)() for r in self._routers]
        if not self.training or not any(widths):
            return
        parts = [torch.zeros(w, dtype=torch.int64, device=self._device) for w in widths]
        for t, _, module in self.local_runs():
            if widths[t]:
                parts[t] += module.shared_increment()
        total = torch.cat(parts)
        if self._env.world_size > 1:
            torch.distributed.all_reduce(total, group=self._group)
        totals = torch.split(total, widths)
        for t, _, module in self.local_runs():
            if widths[t]:
                module.take_shared(totals[t])

    def _count(self, rows: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Decode the owners' marks (``-1 - row``: no slot) and add this rank's ids per counted
        feature that found no slot and that read the fallback row (no sync: device tensors)."""
        unplaced = rows < 0
        rows = torch.where(unplaced, -1 - rows, rows)
        if not self._counted:
            return rows
        _, _, picked, fallback_rows = self._on(rows.device)
        per_feature = torch.tensor(sizes, dtype=torch.int64, device=rows.device)
        fallback = repeat_counts(fallback_rows, per_feature, output_size=rows.numel())
        edges = torch.cat([per_feature.new_zeros(1), per_feature.cumsum(0)])
        for counts, flags in ((self.unplaced, unplaced), (self.fallback, rows == fallback)):
            running = torch.cat([flags.new_zeros(1, dtype=torch.int64), flags.to(torch.int64).cumsum(0)])
            per_feature = running[edges[1:]] - running[edges[:-1]]
            counts.add_(per_feature[picked])
        return rows

    def _weights(self, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
        weights = features.weights_or_none()
        if weights is None:
            return None
        index, starts, counts = features.index_per_key(), features.offset_per_key(), features.length_per_key()
        return torch.cat([weights.narrow(0, starts[index[f]], counts[index[f]]) for f in self._feature_names])

    # --- what the modules report ------------------------------------------------------------
    def unplaced_counts(self) -> Dict[str, torch.Tensor]:
        """Per feature of a table with a fallback row (hash tables), ``[]`` int64 on the device:
        this rank's ids that found no slot (bucket full, nothing evictable), summed over batches.
        No sync, no collective: the world's count is the sum over the ranks."""
        return {f: self.unplaced[i] for i, f in enumerate(self._counted)}

    def fallback_counts(self) -> Dict[str, torch.Tensor]:
        """As :meth:`unplaced_counts`: this rank's ids that read the fallback row."""
        return {f: self.fallback[i] for i, f in enumerate(self._counted)}

    def evict(self) -> Dict[str, Optional[torch.Tensor]]:
        """Per table, the global rows of this rank's buckets whose ids were replaced since the
        last call (None when none were)."""
        out: Dict[str, Optional[torch.Tensor]] = {}
        for t, _, m in self.local_runs():
            rows = m.evict()
            if rows is not None:
                name = self._layout.names[t]
                out[name] = rows if out.get(name) is None else torch.cat([out[name], rows])
        return {name: out.get(name) for name in self._layout.names}

    def open_slots(self) -> Dict[str, torch.Tensor]:
        """Per table, the free slots of this rank's buckets (``[1]``)."""
        out = {name: torch.zeros(1, dtype=torch.int64, device=self._device) for name in self._layout.names}
        for t, _, m in self.local_runs():
            out[self._layout.names[t]] = out[self._layout.names[t]] + m.open_slots().to(self._device)
        return out

    # --- state_dict ---------------------------------------------------------------------------
    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The unsharded module's keys: slot-indexed entries as ``ShardedTensor``s (this rank's
        runs' blocks, global metadata from the layout, so no collective), the rest (the
        iteration, the segments, a hash table's admission counters) plain, from this rank's
        first run of the table."""
        return state_entries(self, destination if destination is not None else OrderedDict(), prefix)


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
