"""A run of consecutive buckets of a ``HashEmbeddingBagCollection``'s hashed table as one
managed-collision module, so that ``mc_modules.ShardedManagedCollisionCollection`` routes,
remaps and checkpoints it.

A hashed table of ``num_buckets`` buckets of ``bucket_size`` slots (``hash_table.py``) becomes a
``ManagedCollisionCollection`` of one ``HashBucketModule`` per table: the collection's router
sends an id to bucket ``hash_probe_torch.bucket_of(mix(id), 0, num_buckets)``, as the
unsharded state does, and
each rank keeps its run of the table's buckets as one module (``holds_bucket_runs()``): the
run's ``keys``, ``last_step`` and ``count`` (``[buckets * bucket_size]`` each:
``row_state_names()``, so ``dcp`` reshards them at bucket edges) and the training step ``step``
(``[1]``: every bucket is stepped once per training batch, so it equals the unsharded
``step``). Placement and eviction inside a bucket read that bucket's slots, the batch's ids of
the bucket as a set (``hash_place_torch.train_step`` ranks new ids by value) and the step only:
a run remapped alone gives the unsharded module's rows, bit for bit.

Admission by frequency: the unsharded table counts the batch's missing ids of all its buckets
in shared counters (the sketch) before admitting any. So each bucket module keeps a copy of its
table's sketch (``sketch``, ``[width]``, a plain entry of the state_dict): ``profile`` counts
its missing ids (``shared_increment()``), the sharded collection sums the counts of every
bucket over all ranks, and each copy takes the batch's total less its own before ``remap``
adds its own (``take_shared``): every copy then holds the unsharded sketch, bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from jaggedrec.modules.hash_table import EVICTION_POLICIES, HashTableOptions
from jaggedrec.modules.mc_modules import ManagedCollisionModule
from jaggedrec.ops import hash_place_torch as place
from jaggedrec.ops import hash_probe_torch as hp
from jaggedrec.sparse.jagged_tensor import JaggedTensor

_ROW_STATE = ("keys", "last_step", "count")


class HashBucketModule(ManagedCollisionModule):
    """Buckets ``[bucket, bucket + span)`` of hashed table ``name``: their raw int64 ids -> global rows.

    Args:
        name: the table.
        num_embeddings: the table's rows (its last the fallback row).
        options: the table's ``HashTableOptions``.
        bucket: the first bucket this module holds (the router: 0, on meta).
        device: where its state lives.
        span: how many buckets it holds (a rank's run in a sharded collection; the whole table
            when it carries an unsharded module's state to be cut into runs).
        counts_lookups: keep ``count`` (the unsharded collection keeps it for every table when
            one of them evicts by LFU; default: when this one does).
    """

    def __init__(self, name: str, num_embeddings: int, options: HashTableOptions, bucket: int = 0,
                 device: Optional[torch.device] = None, span: int = 1,
                 counts_lookups: Optional[bool] = None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(device, [], skip_state_validation=True)
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
        self._width = (options.sketch_width or 4 * num_embeddings) if options.admit_threshold > 1 else 0
        self._sketch_full = torch.zeros(self._width + 1, dtype=torch.int64, device=device)
        if self._width:
            self.register_buffer("sketch", self._sketch_full.narrow(0, 0, self._width))
        self._increment: Optional[torch.Tensor] = None
        self._policy = torch.tensor([EVICTION_POLICIES[options.eviction], place.POLICY_NONE], device=device)
        self._ttl = torch.tensor([options.ttl, 0], device=device)
        self._evicted: List[torch.Tensor] = []
        self._unplaced: Optional[torch.Tensor] = None

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

    def holds_bucket_runs(self) -> bool:
        """One module holds a rank's consecutive buckets (``remap`` takes them together)."""
        return True

    def bucket_range(self) -> Tuple[int, int]:
        """``(first bucket, buckets)`` this module holds."""
        return self._bucket, self._span

    def fallback_row(self) -> int:
        """The row every id without one of its own reads (the table's last)."""
        return self._rows - 1

    def last_unplaced(self) -> Optional[torch.Tensor]:
        """``[N]`` bool over the last ``remap``'s ids (its features' in order): found no slot
        (None after an eval remap)."""
        return self._unplaced

    # --- ManagedCollisionModule ------------------------------------------------------------
    def preprocess(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        return features

    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        """Training with admission: count the missing ids into ``shared_increment()``."""
        if self.training and self._width:
            raw = torch.cat([jt.values() for jt in features.values()]).to(torch.int64)
            found, _ = hp.probe(self._full["keys"], self._options.bucket_size, raw, self._buckets_of(raw))
            self._increment = torch.bincount(self._sketch_index(raw)[~found], minlength=self._width)
        return features

    def shared_width(self) -> int:
        """Counters shared by the table's buckets (the admission sketch; 0 without admission)."""
        return self._width

    def shared_increment(self) -> torch.Tensor:
        """``[width]`` int64: this bucket's missing ids of the batch per counter (``profile``'s)."""
        if self._increment is None:
            return torch.zeros(self._width, dtype=torch.int64, device=self._sketch_full.device)
        return self._increment

    @torch.no_grad()
    def take_shared(self, total: torch.Tensor) -> None:
        """Add the batch's ``[width]`` counts of every bucket but this one (``remap`` adds its own)."""
        self.sketch.add_(total - self.shared_increment())
        self._increment = None

    def _sketch_index(self, raw: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.int64, device=raw.device)
        return hp.sketch_of(hp.mix(raw), zero, zero + self._width)

    def _buckets_of(self, raw: torch.Tensor) -> torch.Tensor:
        return self.bucket_of(raw) - self._bucket if self._span > 1 else torch.zeros_like(raw)

    @torch.no_grad()
    def remap(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True,
              write_weights: Optional[torch.Tensor] = None) -> Dict[str, JaggedTensor]:
        """The run's ids of every feature given (training: placed together, evicting per the
        policy, as the unsharded table places a batch) -> their global rows (the fallback row
        where an id has none)."""
        names = list(features)
        parts = [features[k].values() for k in names]
        raw = torch.cat(parts).to(torch.int64) if parts else self.step.new_zeros(0)
        rows = self._rows_of(raw, names, [p.numel() for p in parts])
        return {k: JaggedTensor(values=r, lengths=features[k].lengths())
                for k, r in zip(names, torch.split(rows, [p.numel() for p in parts]))}

    def _rows_of(self, raw: torch.Tensor, names: List[str], sizes: List[int]) -> torch.Tensor:
        size = self._options.bucket_size
        keys, last_step, count = (self._full[k] for k in _ROW_STATE)
        buckets = self._buckets_of(raw)
        if self.training:
            self.step.add_(1)
            mask = torch.ones_like(raw, dtype=torch.bool)
            admission = None
            if self._width:
                admission = (self._sketch_index(raw), torch.full_like(raw, self._options.admit_threshold))
            placement = place.train_step(keys, last_step, count, self._sketch_full, self.step, size, raw, buckets,
                                         mask, torch.zeros_like(raw), self._policy, self._ttl, admission,
                                         compact=raw.device.type == "cpu",
                                         counts_lookups=self._counts_lookups)
            slot, evicted = placement.slot, placement.evicted_slot
            self._unplaced = placement.unplaced
            # 'fallback' needs no host read (the collection counts the marked rows); 'raise' does
            if self._options.unplaced == "raise" and bool(placement.unplaced.any()):
                per_feature = [int(u.sum()) for u in torch.split(placement.unplaced, sizes)]
                k = next(i for i, n in enumerate(per_feature) if n)
                raise RuntimeError(f"hash table '{self._name}', feature '{names[k]}': {per_feature[k]} ids of "
                                   f"buckets [{self._bucket}, {self._bucket + self._span}) found no slot (bucket "
                                   f"full, nothing evictable; unplaced='raise')")
            base = self._bucket * size
            gone = evicted[evicted >= 0]
            if gone.numel():
                self._evicted.append(gone + base)
        else:
            self._unplaced = None
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
        """The module of the buckets whose rows are ``[start, end)`` (bucket edges)."""
        start, end = output_id_range
        size = self._options.bucket_size
        if start % size or end % size or not 0 <= start < end <= self._num_buckets * size:
            raise ValueError(f"hash table '{self._name}': rows [{start}, {end}) are not whole buckets of {size} "
                             f"slots within its {self._num_buckets} buckets")
        return type(self)(self._name, self._rows, self._options, start // size, device or self.device,
                          span=(end - start) // size, counts_lookups=self._counts_lookups)
