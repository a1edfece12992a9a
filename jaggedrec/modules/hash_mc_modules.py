"""Multi-probe zero-collision hashing with TorchRec's API
(``torchrec.modules.hash_mc_modules.HashZchManagedCollisionModule``), on torch ops (CPU and
any device; TorchRec's runs on FBGEMM's CUDA op, and read-only on CPU).

The table's rows are split into ``total_num_buckets`` buckets (``output_segments``); an id
belongs to one bucket (``id % total_num_buckets``, or ``id // ceil(input_hash_size / buckets)``
when ``input_hash_size`` is set), starts at a hashed home slot in it and probes up to
``max_probe`` consecutive slots (circularly). ``_hash_zch_identities [zch_size, 1]`` holds each
slot's id (-1: free). The slot an id gets is ours (our hash), not FBGEMM's.

In training an id missing from its probe window takes the first free slot of it (with an
eviction policy, a slot whose id expired counts as free: TTL takes the first, LRU the one
accessed longest ago); distinct new ids contending for one slot are settled in rounds, the
smallest id first. Ids that find no slot read their home slot, shared (TorchRec's fallback),
or are dropped with ``disable_fallback=True``; either way :meth:`unplaced_count` counts them,
and ``unplaced="raise"`` raises naming the feature.

Opt-in (``opt_in_prob`` in 0..100, with ``percent_reserved_slots``): the last
:meth:`get_reserved_slots_per_bucket` slots of each bucket are reserved and never hold an id;
ids probe only the bucket's other slots. In training a new id (one its window does not hold)
is admitted with probability ``opt_in_prob`` percent (one ``torch.rand`` draw per id, as
TorchRec's); an id not admitted, and an id that finds no slot, reads a reserved slot picked by its
hash, shared, without counting as unplaced. With the LRU policy opt-in does not apply (as in
FBGEMM's kernel). ``track_id_freq``: ``_hash_zch_runtime_meta [zch_size, 1]`` counts, per slot,
the training lookups of the id it holds, from 0 when the slot gets a new id.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from jaggedrec.modules.embedding_configs import ConfigError
from jaggedrec.modules.hash_mc_evictions import (
    HashZchEvictionConfig,
    HashZchEvictionModule,
    HashZchEvictionPolicyName,
)
from jaggedrec.modules.hash_mc_placement import ZchPlacement
from jaggedrec.modules.mc_modules import ManagedCollisionModule
from jaggedrec.sparse.jagged_tensor import JaggedTensor, repeat_counts

__all__ = ["HashZchManagedCollisionModule"]

class HashZchManagedCollisionModule(ZchPlacement, ManagedCollisionModule):
    IDENTITY_BUFFER: str = "_hash_zch_identities"
    METADATA_BUFFER: str = "_hash_zch_metadata"
    BUCKET_BUFFER: str = "_hash_zch_bucket"

    def __init__(self, zch_size: int, device: torch.device, total_num_buckets: int, max_probe: int = 128,
                 input_hash_size: int = 0, output_segments: Optional[List[int]] = None, is_inference: bool = False,
                 name: Optional[str] = None, tb_logging_frequency: int = 0,
                 eviction_policy_name: Optional[HashZchEvictionPolicyName] = None,
                 eviction_config: Optional[HashZchEvictionConfig] = None,
                 inference_dispatch_div_train_world_size: bool = False, start_bucket: int = 0,
                 end_bucket: Optional[int] = None, opt_in_prob: int = -1, percent_reserved_slots: float = 0,
                 disable_fallback: bool = False, track_id_freq: bool = False, read_only_suffix: str = "_readonly",
                 enable_per_feature_lookups: bool = False, no_bag: bool = False, write_runtime_meta_dim: int = 0,
                 persist_hash_zch_bucket: bool = True, unplaced: str = "fallback") -> None:
        if output_segments is None:
            if zch_size % total_num_buckets:
                raise ValueError(f"HashZchManagedCollisionModule {name}: zch_size {zch_size} is not a multiple of "
                                 f"total_num_buckets {total_num_buckets}; pass output_segments")
            output_segments = [zch_size // total_num_buckets * b for b in range(total_num_buckets + 1)]
        if not 0 <= percent_reserved_slots < 100:
            raise ConfigError(f"HashZchManagedCollisionModule {name}: percent_reserved_slots must be in "
                              f"[0, 100), got {percent_reserved_slots}")
        if opt_in_prob > 0 and percent_reserved_slots <= 0:
            raise ConfigError(f"HashZchManagedCollisionModule {name}: opt_in_prob {opt_in_prob} needs "
                              "percent_reserved_slots > 0")
        if track_id_freq and write_runtime_meta_dim > 0:
            raise ConfigError(f"HashZchManagedCollisionModule {name}: track_id_freq and write_runtime_meta_dim "
                              "both use _hash_zch_runtime_meta; set one")
        if unplaced not in ("fallback", "raise"):
            raise ValueError(f"HashZchManagedCollisionModule {name}: unplaced must be 'fallback' or 'raise'")
        super().__init__(device=device, output_segments=output_segments, skip_state_validation=True,
                         read_only_suffix=read_only_suffix, enable_per_feature_lookups=enable_per_feature_lookups)
        self._zch_size = zch_size
        self._output_segments = list(output_segments)
        self._start_bucket = start_bucket
        self._end_bucket = total_num_buckets if end_bucket is None else end_bucket
        self._opt_in_prob = opt_in_prob
        self._percent_reserved_slots = percent_reserved_slots
        self._track_id_freq = track_id_freq
        self._tb_logging_frequency = tb_logging_frequency
        self._dispatch_div = inference_dispatch_div_train_world_size
        self._persist_hash_zch_bucket = persist_hash_zch_bucket
        # per bucket, as TorchRec counts them: this module's share of the table over its buckets
        self._reserved = (-1 if opt_in_prob == -1 else
                          int(zch_size * percent_reserved_slots / 100 / (self._end_bucket - start_bucket)))
        own_sizes = [output_segments[b + 1] - output_segments[b] for b in range(start_bucket, self._end_bucket)]
        if self._reserved != -1 and not 1 <= self._reserved < min(own_sizes):
            raise ConfigError(f"HashZchManagedCollisionModule {name}: opt-in needs 1 to (bucket size - 1) "
                              f"reserved slots per bucket; percent_reserved_slots {percent_reserved_slots} "
                              f"gives {self._reserved} of buckets of {min(own_sizes)}")
        self._input_hash_size = input_hash_size
        self._is_inference = is_inference
        self._name = name
        self._max_probe = max_probe
        self._buckets = total_num_buckets
        self._disable_fallback = disable_fallback
        self._no_bag = no_bag
        self._unplaced = unplaced
        self._eviction_policy_name = eviction_policy_name
        self._eviction_config = eviction_config
        self._eviction_module = (HashZchEvictionModule(eviction_policy_name, device, eviction_config)
                                 if eviction_policy_name is not None else None)
        lru = eviction_policy_name == HashZchEvictionPolicyName.LRU_EVICTION
        self._opt_in_reserved = 0 if lru or self._reserved == -1 else self._reserved  # slots ids do not probe
        dev = torch.device(device)
        self._hash_zch_identities = torch.nn.Parameter(torch.full((zch_size, 1), -1, dtype=torch.int64, device=dev),
                                                       requires_grad=False)
        self.register_buffer(self.METADATA_BUFFER, torch.full((zch_size, 1), -1, dtype=torch.int32, device=dev))
        self.register_buffer(self.BUCKET_BUFFER, torch.tensor([[total_num_buckets]]),
                             persistent=persist_hash_zch_bucket)
        segs = torch.tensor(output_segments, dtype=torch.int64, device=dev)
        self.register_buffer("_segment_starts", segs[:-1] - segs[start_bucket], persistent=False)
        self.register_buffer("_segment_sizes", segs[1:] - segs[:-1] - self._opt_in_reserved, persistent=False)
        self.register_buffer("_unplaced_count", torch.zeros(1, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("_evicted_mask", torch.zeros(zch_size, dtype=torch.bool, device=dev), persistent=False)
        # [zch_size, write_runtime_meta_dim] int64 written by remap(write_weights=...), zeroed when
        # the slot's id is replaced
        self._hash_zch_runtime_meta: Optional[torch.Tensor] = None
        if write_runtime_meta_dim > 0 or track_id_freq:
            self._hash_zch_runtime_meta = torch.nn.Parameter(
                torch.zeros((zch_size, max(write_runtime_meta_dim, 1)), dtype=torch.int64, device=dev),
                requires_grad=False)
        self._write_runtime_meta_dim = write_runtime_meta_dim
        self._evicted = False
        if is_inference:
            self.eval()

    # --- the contract ---------------------------------------------------------------------------
    def preprocess(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        return features

    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        return features

    def forward(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True
                ) -> Dict[str, JaggedTensor]:
        return self.remap(features, mutate_miss_lengths=mutate_miss_lengths)

    @torch.no_grad()
    def remap(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True,
              write_weights: Optional[torch.Tensor] = None) -> Dict[str, JaggedTensor]:
        out: Dict[str, JaggedTensor] = {}
        for name, jt in features.items():
            writes = self.training and not name.lower().endswith(self._read_only_suffix)
            raw = jt.values().to(torch.int64)
            ids = self.table_keys(raw)
            rows, hit = self._place(ids, self.bucket_of(raw), jt if writes else None)
            misses = (~hit).sum().reshape(1)
            self._unplaced_count.add_(misses)
            if self._unplaced == "raise":
                torch._assert_async((misses == 0).all(), f"HashZchManagedCollisionModule {self._name}: feature {name} "
                                    "has ids with no slot in their probe window (unplaced='raise')")
            if write_weights is not None and writes:
                self.update_runtime_meta(ids, rows, write_weights)
            rows = rows + self._output_segments[self._start_bucket]
            lengths, offsets = jt.lengths(), jt.offsets()
            if self._disable_fallback:
                if self._no_bag:
                    rows = torch.where(hit, rows, 0)
                else:
                    bag = repeat_counts(torch.arange(lengths.numel(), device=rows.device), lengths.long(),
                                        output_size=rows.numel())
                    rows = rows[hit]
                    if mutate_miss_lengths:
                        lengths = torch.zeros_like(lengths).index_add_(0, bag[hit], torch.ones_like(rows).to(
                            lengths.dtype))
                        offsets = None
            out[name] = JaggedTensor(values=rows.to(jt.values().dtype), lengths=lengths, offsets=offsets,
                                     weights=None if self._disable_fallback and not self._no_bag
                                     else jt.weights_or_none())
        return out

    @torch.no_grad()
    def evict(self) -> Optional[torch.Tensor]:
        """The rows (ascending, global) whose expired ids were replaced since the last call, or None."""
        if not self._evicted:
            return None
        self._evicted = False
        rows = torch.nonzero(self._evicted_mask).reshape(-1) + self._output_segments[self._start_bucket]
        self._evicted_mask.zero_()
        return rows

    @property
    def is_sharded(self) -> bool:
        """Whether this module holds only some of the buckets (a row-wise shard)."""
        return self._start_bucket != 0 or self._end_bucket != self._buckets

    @property
    def max_probe(self) -> int:
        return self._max_probe

    @property
    def disable_fallback(self) -> bool:
        return self._disable_fallback

    def lookup_runtime_meta(self, features: torch.Tensor, remapped_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` raw ids and their ``[N]`` rows -> ``[N * D]`` runtime metadata (0 where the row
        holds another id; -1 everywhere without runtime metadata)."""
        if self._hash_zch_runtime_meta is None:
            return torch.full_like(remapped_ids, -1)
        hit = self._hash_zch_identities.view(-1)[remapped_ids] == features
        return torch.where(hit[:, None], self._hash_zch_runtime_meta[remapped_ids], 0).reshape(-1)

    def lookup_custom_runtime_meta(self, remapped_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` rows -> ``[N, D]`` runtime metadata."""
        if self._hash_zch_runtime_meta is None:
            raise ValueError(f"HashZchManagedCollisionModule {self._name}: no runtime metadata "
                             "(write_runtime_meta_dim=0)")
        return torch.index_select(self._hash_zch_runtime_meta, 0, remapped_ids)

    @torch.no_grad()
    def update_runtime_meta(self, raw_ids: torch.Tensor, remapped_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Write ``[N]`` or ``[N, D]`` ``weights`` at the (local) rows that hold their id."""
        if self._hash_zch_runtime_meta is None:
            raise ValueError(f"HashZchManagedCollisionModule {self._name}: write_weights needs write_runtime_meta_dim > 0")
        meta = self._hash_zch_runtime_meta
        weights = weights.reshape(weights.shape[0], -1).to(meta.dtype)
        own = self._hash_zch_identities.view(-1)[remapped_ids] == raw_ids
        target = torch.where(own, remapped_ids, self._zch_size)
        ext = torch.cat([meta.data, meta.data.new_zeros(1, meta.shape[1])]).index_put_((target,), weights)
        meta.data.copy_(ext[:-1])

    def output_size(self) -> int:
        return self._zch_size

    def input_size(self) -> int:
        return self._input_hash_size

    def buckets(self) -> int:
        return self._buckets

    def open_slots(self) -> torch.Tensor:
        """``[1]`` free slots (never used; expired ones not counted)."""
        return (self._hash_zch_identities == -1).sum().reshape(1)

    def unplaced_count(self) -> torch.Tensor:
        """``[1]`` int64: ids that found no slot of their own, summed over batches."""
        return self._unplaced_count

    def validate_state(self) -> None:
        return None

    def reset_inference_mode(self) -> None:
        self.eval()

    def rebuild_with_output_id_range(self, output_id_range: Tuple[int, int], output_segments: Optional[List[int]] = None,
                                     device: Optional[torch.device] = None) -> "HashZchManagedCollisionModule":
        segments = output_segments if output_segments is not None else self._output_segments
        start = segments.index(output_id_range[0])
        return type(self)(zch_size=output_id_range[1] - output_id_range[0], device=device or self.device,
                          total_num_buckets=self._buckets, max_probe=self._max_probe,
                          input_hash_size=self._input_hash_size, output_segments=segments, name=self._name,
                          is_inference=self._is_inference, tb_logging_frequency=self._tb_logging_frequency,
                          inference_dispatch_div_train_world_size=self._dispatch_div,
                          eviction_policy_name=self._eviction_policy_name, eviction_config=self._eviction_config,
                          start_bucket=start, end_bucket=segments.index(output_id_range[1]),
                          opt_in_prob=self._opt_in_prob, percent_reserved_slots=self._percent_reserved_slots,
                          disable_fallback=self._disable_fallback, track_id_freq=self._track_id_freq,
                          read_only_suffix=self._read_only_suffix,
                          enable_per_feature_lookups=self._enable_per_feature_lookups, no_bag=self._no_bag,
                          write_runtime_meta_dim=self._write_runtime_meta_dim,
                          persist_hash_zch_bucket=self._persist_hash_zch_bucket, unplaced=self._unplaced)

    def get_reserved_slots_per_bucket(self) -> int:
        """Reserved slots at the end of each bucket, or -1 without opt-in (``opt_in_prob=-1``)."""
        return self._reserved

    def get_indices_of_reserved_slots_per_bucket(self) -> Optional[torch.Tensor]:
        """``[buckets * reserved]`` int64 local rows of this module's buckets' reserved slots, or None."""
        if self._reserved == -1:
            return None
        segs, first = self._output_segments, self._output_segments[self._start_bucket]
        return torch.cat([torch.arange(segs[b + 1] - self._reserved, segs[b + 1], device=self.device) - first
                          for b in range(self._start_bucket, self._end_bucket)])

    def bucket_segments(self) -> List[int]:
        """The ``buckets() + 1`` row edges of the buckets (``output_segments``)."""
        return list(self._output_segments)

    def row_state_names(self) -> List[str]:
        """The state_dict entries indexed by slot (``[zch_size, ...]``): a row-wise shard holds its block."""
        names = [self.IDENTITY_BUFFER, self.METADATA_BUFFER]
        return names + (["_hash_zch_runtime_meta"] if self._hash_zch_runtime_meta is not None else [])
