"""One bucket of a ``HashEmbeddingBagCollection``'s hashed table as a managed-collision module,
so that ``mc_modules.ShardedManagedCollisionCollection`` routes, remaps and checkpoints it.

A hashed table of ``num_buckets`` buckets of ``bucket_size`` slots (``hash_table.py``) becomes a
``ManagedCollisionCollection`` of one ``HashBucketModule`` per table: the collection's router
(built for bucket 0) sends an id to bucket ``(mix(id) & 2^63-1) % num_buckets``, as the unsharded
state does, and each bucket's owner keeps that bucket's ``keys``, ``last_step`` and ``count``
(``[bucket_size]`` each: ``row_state_names()``, so ``dcp`` moves whole buckets) and the training
step ``step`` (``[1]``: every bucket is stepped once per training batch, so it equals the
unsharded ``step``). Placement and eviction inside a bucket read that bucket's slots, the
batch's ids of the bucket as a set (``hash_probe_torch.train_step`` ranks new ids by value) and
the step only: a bucket remapped alone gives the unsharded module's rows, bit for bit.

Not carried over: admission by frequency (the unsharded sketch counts ids of every bucket in
shared counters), refused by ``check_shardable``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from jaggedrec.modules.hash_table import EVICTION_POLICIES, HashTableOptions
from jaggedrec.modules.mc_modules import ManagedCollisionModule
from jaggedrec.ops import hash_probe_torch as hp
from jaggedrec.sparse.jagged_tensor import JaggedTensor

_ROW_STATE = ("keys", "last_step", "count")


def check_shardable(name: str, options: HashTableOptions) -> None:
    """Raise a ValueError naming table ``name`` when its options cannot be sharded by bucket."""
    if options.admit_threshold > 1:
        raise ValueError(f"hash table '{name}': admit_threshold {options.admit_threshold} is not supported when "
                         f"sharded (the admission counters are shared by every bucket of the table); shard it "
                         f"with admit_threshold=1 or keep the collection unsharded")


class HashBucketModule(ManagedCollisionModule):
    """Bucket ``bucket`` of hashed table ``name``: raw int64 ids of the bucket -> global rows.

    Args:
        name: the table.
        num_embeddings: the table's rows (its last the fallback row).
        options: the table's ``HashTableOptions``.
        bucket: the first bucket this module holds (the router: 0, on meta).
        device: where its state lives.
        span: how many buckets it holds (1 in a sharded collection; the whole table when it
            carries an unsharded module's state to be cut into buckets).
        counts_lookups: keep ``count`` (the unsharded collection keeps it for every table when
            one of them evicts by LFU; default: when this one does).
    """

    def __init__(self, name: str, num_embeddings: int, options: HashTableOptions, bucket: int = 0,
                 device: Optional[torch.device] = None, span: int = 1,
                 counts_lookups: Optional[bool] = None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(device, [], skip_state_validation=True)
        check_shardable(name, options)
        self._name, self._rows, self._options = name, num_embeddings, options
        size = options.bucket_size
        self._num_buckets = (num_embeddings - 1) // size
        if self._num_buckets < 1:
            raise ValueError(f"hash table '{name}': num_embeddings {num_embeddings} leaves no bucket of {size} "
                             f"slots beside the fallback row")
        self._bucket, self._span = bucket, span
        self._counts_lookups = options.eviction == "lfu" if counts_lookups is None else counts_lookups
        slots = size * span
        # the step works on [slots + 1] (the last a scratch slot); the buffers are views of the
        # first slots, so state_dict and loads see the buckets' slots only
        self._full = {k: torch.zeros(slots + 1, dtype=torch.int64, device=device) for k in _ROW_STATE}
        if device.type != "meta":
            self._full["keys"].fill_(hp.EMPTY)
        for k in _ROW_STATE:
            self.register_buffer(k, self._full[k].narrow(0, 0, slots))
        self.register_buffer("step", torch.zeros(1, dtype=torch.int64, device=device))
        self._policy = torch.tensor([EVICTION_POLICIES[options.eviction], hp.POLICY_NONE], device=device)
        self._ttl = torch.tensor([options.ttl, 0], device=device)
        self._evicted: List[torch.Tensor] = []
        self.unplaced = 0

    # --- the bucket protocol of mc_modules.ShardedManagedCollisionCollection -----------------
    def bucket_segments(self) -> List[int]:
        """The ``num_buckets + 1`` row edges of the table's buckets (the fallback row is in none)."""
        size = self._options.bucket_size
        return [k * size for k in range(self._num_buckets + 1)]

    def bucket_of(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 raw ids -> ``[N]`` bucket, as ``HashTableState`` places them."""
        zero = torch.zeros((), dtype=torch.int64, device=ids.device)
        return hp.bucket_of(hp.mix(ids.to(torch.int64)), zero, zero + self._num_buckets)

    def row_state_names(self) -> List[str]:
        return list(_ROW_STATE)

    # --- ManagedCollisionModule ------------------------------------------------------------
    def preprocess(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        return features

    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        return features

    @torch.no_grad()
    def remap(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True,
              write_weights: Optional[torch.Tensor] = None) -> Dict[str, JaggedTensor]:
        """The bucket's ids (training: placed, evicting per the policy) -> their global rows
        (the fallback row where an id has none)."""
        out = {}
        for key, jt in features.items():
            out[key] = JaggedTensor(values=self._rows_of(jt.values()), lengths=jt.lengths())
        return out

    def _rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        raw = ids.to(torch.int64)
        size = self._options.bucket_size
        keys, last_step, count = (self._full[k] for k in _ROW_STATE)
        buckets = self.bucket_of(raw) - self._bucket if self._span > 1 else torch.zeros_like(raw)
        if self.training:
            self.step.add_(1)
            mask = torch.ones_like(raw, dtype=torch.bool)
            placement = hp.train_step(keys, last_step, count, torch.zeros(1, dtype=torch.int64, device=raw.device),
                                      self.step, size, raw, buckets, mask, torch.zeros_like(raw), self._policy,
                                      self._ttl,
                                      compact=raw.device.type == "cpu",
                                      counts_lookups=self._counts_lookups)
            slot, evicted = placement.slot, placement.evicted_slot
            unplaced = int(placement.unplaced.sum())
            self.unplaced += unplaced
            if unplaced and self._options.unplaced == "raise":
                raise RuntimeError(f"hash table '{self._name}': {unplaced} ids of bucket {self._bucket} found no slot "
                                   f"(bucket full, nothing evictable; unplaced='raise')")
            base = self._bucket * size
            gone = evicted[evicted >= 0]
            if gone.numel():
                self._evicted.append(gone + base)
        else:
            slot = hp.lookup(keys, size, raw, buckets, torch.ones_like(raw, dtype=torch.bool))
        return torch.where(slot >= 0, slot + self._bucket * size, self._rows - 1)

    def evict(self) -> Optional[torch.Tensor]:
        """The global rows whose ids were replaced since the last call (None when none were)."""
        if not self._evicted:
            return None
        rows, self._evicted = torch.cat(self._evicted), []
        return rows

    def forward(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True
                ) -> Dict[str, JaggedTensor]:
        return self.remap(features)

    def output_size(self) -> int:
        return self._rows

    def input_size(self) -> int:
        return 2 ** 63

    def buckets(self) -> int:
        return self._num_buckets

    def validate_state(self) -> None:
        return None

    def open_slots(self) -> torch.Tensor:
        return (self.keys == hp.EMPTY).sum().reshape(1)

    def rebuild_with_output_id_range(self, output_id_range: Tuple[int, int], output_segments: List[int],
                                     device: Optional[torch.device] = None) -> "HashBucketModule":
        return type(self)(self._name, self._rows, self._options, list(output_segments).index(output_id_range[0]),
                          device or self.device, counts_lookups=self._counts_lookups)
