"""Hash tables of our own: raw int64 ids to table rows by bucketized open addressing, with
LRU, LFU or TTL eviction and admission by frequency (the rules: ``jaggedrec/ops/hash_probe_torch.py``;
the training step: ``hash_place_torch.py``).

``HashTableOptions`` configures one table; ``HashTableState`` holds every hashed table of a
collection in one slot space (buckets of ``bucket_size`` slots, a table's buckets contiguous,
so that a row-wise shard can hold whole buckets) and turns a KJT's raw ids into rows. Row
``r < num_buckets * bucket_size`` of a table is slot ``r`` of its slot space; its last row
(``num_embeddings - 1``) is the *fallback row*, shared by every id that has no row of its own.
``HashEmbeddingBagCollection`` (``hash_embedding_modules.py``) is the user-facing module.

Everything runs on fixed shapes, with no host sync: the counts of ids that found no row are
device tensors (``unplaced_counts()``, ``fallback_counts()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import nn

from jaggedrec.ops import hash_place_torch as place
from jaggedrec.ops import hash_probe_torch as hp
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, repeat_counts

EVICTION_POLICIES = {"none": place.POLICY_NONE, "lru": place.POLICY_LRU, "lfu": place.POLICY_LFU,
                     "ttl": place.POLICY_TTL}
UNPLACED_POLICIES = ("raise", "fallback")


@dataclass(frozen=True)
class HashTableOptions:
    """How one table maps raw ids to rows.

    Attributes:
        bucket_size: slots a bucket, the bound of a probe (the same for every hashed table of a
            collection). The table's ``num_embeddings - 1`` rows make ``(num_embeddings - 1) //
            bucket_size`` buckets (left-over rows are unused); its last row is the fallback row.
        eviction: "lru" (evict the slot looked up longest ago), "lfu" (the fewest look-ups since
            its id came, then the oldest), "ttl" (only slots idle more than ``ttl`` training
            steps, the oldest first) or "none".
        ttl: training steps a slot must be idle before "ttl" may evict it.
        admit_threshold: occurrences an id must reach (in training, while missing) before it
            gets a row; 1 admits at first sight. Below it the id reads the fallback row.
        sketch_width: admission counters of the table (ids hashed onto them; colliding ids
            share one, so an id may be admitted early, never late); 0: ``4 * num_embeddings``.
        unplaced: what an admitted id that finds no slot (bucket full, nothing evictable) does
            in training: "raise" (a ``RuntimeError`` naming the feature; on GPU at the next
            sync) or "fallback" (read the fallback row). Both count it.
    """

    bucket_size: int = 8
    eviction: str = "lru"
    ttl: int = 0
    admit_threshold: int = 1
    sketch_width: int = 0
    unplaced: str = "raise"

    def __post_init__(self) -> None:
        if self.bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {self.bucket_size}")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {sorted(EVICTION_POLICIES)}, got {self.eviction!r}")
        if self.ttl < 0 or self.admit_threshold < 1 or self.sketch_width < 0:
            raise ValueError(f"ttl and sketch_width must be >= 0 and admit_threshold >= 1, got {self}")
        if self.unplaced not in UNPLACED_POLICIES:
            raise ValueError(f"unplaced must be one of {UNPLACED_POLICIES}, got {self.unplaced!r}")


class HashedTable(NamedTuple):
    """One hashed table as the state sees it."""

    name: str
    num_embeddings: int
    features: Tuple[str, ...]
    options: HashTableOptions


class Remapped(NamedTuple):
    """:meth:`HashTableState.remap`'s answer: the rows, and the evictions as ``[E]`` pairs
    (hashed table, row): every position on fixed shapes (``E = N``; row ``-1`` where the
    position evicted nothing, table ``H`` where its feature is not hashed), only the positions
    that evicted when the step compacts."""

    values: torch.Tensor  # [N] rows, in the ids' dtype (other features' ids as they were)
    table: torch.Tensor  # [E] int64 hashed table index of each eviction
    evicted_row: torch.Tensor  # [E] int64 row whose id was evicted (-1: none)


class HashTableState(nn.Module):
    """The slot space of a collection's hashed tables (buffers, in ``state_dict()``):
    ``keys``, ``last_step``, ``count`` (``[num_slots + 1]`` int64; the last a scratch slot;
    ``count`` is kept only when some table evicts by LFU),
    ``sketch`` (``[sum of sketch widths + 1]`` int64) and ``step`` (``[1]`` int64, training
    batches seen); and the counts ``unplaced`` / ``fallback`` (``[F]`` int64 per hashed feature,
    not saved).

    Args:
        tables: the hashed tables.
        device: where the state lives.
    """

    def __init__(self, tables: Sequence[HashedTable], device=None) -> None:
        super().__init__()
        sizes = {t.options.bucket_size for t in tables}
        if len(sizes) != 1:
            raise ValueError(f"every hashed table of a collection needs one bucket_size, got {sorted(sizes)}")
        self.bucket_size = sizes.pop()
        self.tables = tuple(tables)
        self.features = tuple(f for t in tables for f in t.features)
        columns: Dict[str, List[int]] = {k: [] for k in ("bucket_base", "num_buckets", "sketch_base", "sketch_width",
                                                           "threshold", "policy", "ttl", "fallback", "slot_base")}
        buckets = sketch = 0
        for t in tables:
            num_buckets = (t.num_embeddings - 1) // self.bucket_size
            if num_buckets < 1:
                raise ValueError(f"table '{t.name}': num_embeddings {t.num_embeddings} leaves no bucket of "
                                 f"{self.bucket_size} slots beside the fallback row")
            if num_buckets >= hp.MAX_BUCKETS:
                raise ValueError(f"table '{t.name}': {num_buckets} buckets; at most {hp.MAX_BUCKETS - 1} a table "
                                 f"(the bucket of an id is 32 bits of its hash scaled to the table)")
            width = t.options.sketch_width or 4 * t.num_embeddings
            for key, value in (("bucket_base", buckets), ("num_buckets", num_buckets), ("sketch_base", sketch),
                               ("sketch_width", width), ("threshold", t.options.admit_threshold),
                               ("policy", EVICTION_POLICIES[t.options.eviction]), ("ttl", t.options.ttl),
                               ("fallback", t.num_embeddings - 1), ("slot_base", buckets * self.bucket_size)):
                columns[key].append(value)
            buckets += num_buckets
            sketch += width
        # the entry past the last table serves features that are not hashed: a harmless bucket 0
        for key, value in (("bucket_base", 0), ("num_buckets", 1), ("sketch_base", sketch), ("sketch_width", 1),
                           ("threshold", 1), ("policy", place.POLICY_NONE), ("ttl", 0), ("fallback", 0),
                           ("slot_base", 0)):
            columns[key].append(value)
        self.num_slots = buckets * self.bucket_size
        self.register_buffer("per_table", torch.tensor([columns[k] for k in columns], dtype=torch.int64,
                                                       device=device), persistent=False)
        self._column = {k: i for i, k in enumerate(columns)}
        self.register_buffer("keys", torch.full((self.num_slots + 1,), hp.EMPTY, dtype=torch.int64, device=device))
        self.register_buffer("last_step", torch.zeros(self.num_slots + 1, dtype=torch.int64, device=device))
        self.register_buffer("count", torch.zeros(self.num_slots + 1, dtype=torch.int64, device=device))
        self.register_buffer("sketch", torch.zeros(sketch + 1, dtype=torch.int64, device=device))
        self.register_buffer("step", torch.zeros(1, dtype=torch.int64, device=device))
        self.register_buffer("unplaced", torch.zeros(len(self.features), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("fallback", torch.zeros(len(self.features), dtype=torch.int64, device=device),
                             persistent=False)
        # eager CPU's probe hint (hash_probe_torch: a byte of each slot's id hash; buckets of 8
        # only), not saved: rebuilt from the keys on load, and self-healing if ever stale
        self.register_buffer("tags", torch.zeros(self.num_slots + 1 if self.bucket_size == hp.TAG_BUCKET else 0,
                                                 dtype=torch.uint8, device=device), persistent=False)
        self.register_load_state_dict_post_hook(_retag_after_load)
        self.eager_compaction = True
        self._key_maps: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._admits = any(t.options.admit_threshold > 1 for t in tables)
        self._counts_lookups = any(t.options.eviction == "lfu" for t in tables)
        self._policies = frozenset(EVICTION_POLICIES[t.options.eviction] for t in tables)
        sizes = set(columns["num_buckets"][:-1])
        self._num_buckets = sizes.pop() if len(sizes) == 1 else 0  # every hashed table's buckets, if one
        rows = set(columns["fallback"][:-1])
        self._fallback_row = rows.pop() if len(rows) == 1 else None  # every hashed table's fallback row, if one
        self._feature_table = {f: i for i, t in enumerate(tables) for f in t.features}
        self._feature_index = {f: i for i, f in enumerate(self.features)}

    def compacts(self, like: torch.Tensor) -> bool:
        """Whether the training step works on the positions that need it only (picked with
        ``nonzero``): on eager CPU tensors, where a data-dependent size waits on no device and
        saves the fixed-shape path's work over every position; never in a compiled or traced
        graph, nor on a GPU. ``eager_compaction = False`` turns it off (the tests run both)."""
        return (self.eager_compaction and like.device.type == "cpu" and not torch.compiler.is_compiling()
                and not isinstance(like, torch.fx.Proxy))

    def retag(self) -> None:
        """Rebuild the probe's tags from the keys (after the keys were written from outside)."""
        if self.tags.numel():
            with torch.no_grad():
                self.tags.copy_(hp.tags_of_keys(self.keys))

    def column(self, name: str) -> torch.Tensor:
        """``[H + 1]`` int64: one per-table constant (``bucket_base``, ``num_buckets``, ...)."""
        return self.per_table[self._column[name]]

    def slot_base(self, table: int) -> int:
        """The table's first slot in the slot space (its row 0)."""
        return int(sum((t.num_embeddings - 1) // self.bucket_size for t in self.tables[:table])) * self.bucket_size

    def key_maps(self, keys: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[K]`` hashed table and ``[K]`` hashed-feature index of each KJT key (``H`` and ``F``
        where the key is not hashed)."""
        tracing = torch.compiler.is_compiling()
        cached = None if tracing else self._key_maps.get((tuple(keys), str(device)))
        if cached is not None:  # eager: one host-to-device copy per key order
            return cached
        tables = [self._feature_table.get(k, len(self.tables)) for k in keys]
        features = [self._feature_index.get(k, len(self.features)) for k in keys]
        maps = (torch.tensor(tables, dtype=torch.int64, device=device),
                torch.tensor(features, dtype=torch.int64, device=device))
        if not tracing:
            self._key_maps[(tuple(keys), str(device))] = maps
        return maps

    def remap(self, kjt: KeyedJaggedTensor) -> Remapped:
        """Rows of the hashed features' raw ids (training: admit, place and evict first).

        Args:
            kjt: ``K`` keys, ``[N]`` values (int32 or int64), ``[K*B]`` lengths.
        """
        ids = kjt.values()
        n = ids.numel()
        key_table, key_feature = self.key_maps(kjt.keys(), ids.device)
        stride = kjt.stride()
        # [K + 1]: where each key's ids start (the values are key-major); no bags: all at 0
        key_offsets = kjt.offsets()[::stride] if stride else ids.new_zeros(len(kjt.keys()) + 1, dtype=torch.int64)
        table = repeat_counts(key_table, key_offsets.diff(), output_size=n)
        hashed_mask = table < len(self.tables)
        raw = ids.to(torch.int64)
        hashed = hp.mix(raw)
        per_table = self.per_table
        bucket_base = self.column("bucket_base").index_select(0, table)
        # one table size (the common case): a scalar divisor, no per-position gather (positions
        # not hashed then get some bucket of the first table: any valid bucket serves them)
        num_buckets = self._num_buckets if self._num_buckets else self.column("num_buckets").index_select(0, table)
        buckets = hp.bucket_of(hashed, bucket_base, num_buckets)
        evicted_at = None
        compact = self.compacts(raw)  # an eager CPU step (placement, tags, per-key counts)
        if self.training:
            admission = None
            if self._admits:
                columns = per_table.index_select(1, table)
                admission = (hp.sketch_of(hashed, columns[self._column["sketch_base"]],
                                          columns[self._column["sketch_width"]]), columns[self._column["threshold"]])
            tags = (self.tags, hp.tag_of(hashed)) if compact and self.tags.numel() else None
            with torch.no_grad():
                self.step.add_(1)
                placement = place.train_step(
                    self.keys, self.last_step, self.count, self.sketch, self.step, self.bucket_size, raw, buckets,
                    hashed_mask, table, self.column("policy"), self.column("ttl"), admission,
                    compact=compact, counts_lookups=self._counts_lookups, policies=self._policies, tags=tags)
            slot, evicted_slot, unplaced = placement.slot, placement.evicted_slot, placement.unplaced
            evicted_at, live = placement.evicted_at, placement.live
        else:
            slot = hp.lookup(self.keys, self.bucket_size, raw, buckets, hashed_mask)
            evicted_slot, unplaced, live = torch.full_like(slot, -1), torch.zeros_like(hashed_mask), None
        # a table's row = its slot less the table's first slot (bucket_base * bucket_size); the
        # fallback row where none; other features' ids as they were
        live = slot >= 0 if live is None else live
        fallback = hashed_mask & ~live
        every_key_hashed = all(k in self._feature_table for k in kjt.keys())  # known per key list
        if every_key_hashed and self._fallback_row is not None:  # one where (the slots are ours: sub_ in place)
            rows = torch.where(live, slot.sub_(bucket_base, alpha=self.bucket_size), self._fallback_row)
        else:
            otherwise = self.column("fallback").index_select(0, table)
            if not every_key_hashed:
                otherwise = torch.where(hashed_mask, otherwise, raw)
            rows = torch.where(live, slot.sub(bucket_base, alpha=self.bucket_size), otherwise)
        values = rows.to(ids.dtype)
        unplaced_per_key, fallback_per_key = _per_key(unplaced, fallback, key_offsets, compact)
        self._count(self.unplaced, unplaced_per_key, key_feature)
        self._count(self.fallback, fallback_per_key, key_feature)
        self._raise_unplaced(unplaced_per_key, kjt.keys())
        if evicted_at is None:  # fixed shapes: every position
            return Remapped(values, table, torch.where(evicted_slot >= 0, evicted_slot - bucket_base * self.bucket_size,
                                                       -1))
        evicted_table = table.index_select(0, evicted_at)
        base = self.column("slot_base").index_select(0, evicted_table)
        return Remapped(values, evicted_table, evicted_slot - base)

    def _count(self, counts: torch.Tensor, per_key: torch.Tensor, key_feature: torch.Tensor) -> None:
        """Add ``[K]`` counts into the ``[F]`` per-feature ``counts`` (keys not hashed: none)."""
        scratch = len(self.features)
        counts.index_add_(0, key_feature.clamp(max=scratch - 1), torch.where(key_feature < scratch, per_key, 0))

    def _raise_unplaced(self, unplaced_per_key: torch.Tensor, keys: Sequence[str]) -> None:
        if not self.training:
            return
        for k, name in enumerate(keys):
            h = self._feature_table.get(name)
            if h is None or self.tables[h].options.unplaced != "raise":
                continue
            torch._assert_async(unplaced_per_key[k] == 0,
                                f"hash table '{self.tables[h].name}', feature '{name}': ids found no slot (bucket "
                                f"full, nothing evictable; unplaced='raise'); unplaced_counts() holds the count "
                                f"per feature")

    def unplaced_counts(self) -> Dict[str, torch.Tensor]:
        """Per hashed feature, a ``[]`` int64 device tensor: admitted ids that found no slot,
        summed over batches (read without a sync until printed)."""
        return {f: self.unplaced[i] for i, f in enumerate(self.features)}

    def fallback_counts(self) -> Dict[str, torch.Tensor]:
        """Per hashed feature, a ``[]`` int64 device tensor: ids that read the fallback row
        (unplaced, not admitted yet, or absent in eval), summed over batches."""
        return {f: self.fallback[i] for i, f in enumerate(self.features)}

    def live_ids(self, table: int) -> torch.Tensor:
        """``[rows - 1]`` int64: the raw id in each row of table ``table`` (``EMPTY`` where free; eager use)."""
        base = self.slot_base(table)
        num_buckets = (self.tables[table].num_embeddings - 1) // self.bucket_size
        return self.keys.narrow(0, base, num_buckets * self.bucket_size)


def _retag_after_load(state: HashTableState, _incompatible_keys) -> None:
    """``load_state_dict`` wrote the keys: the tags follow (a module-level hook: picklable)."""
    state.retag()


def _per_key(unplaced: torch.Tensor, fallback: torch.Tensor, key_offsets: torch.Tensor, eager: bool = False):
    """``([K], [K])`` int64: how many of ``unplaced`` and of ``fallback`` (``[N]`` bool each,
    key-major) each key holds; one running sum of both (fallback in the low 32 bits: N < 2^32).
    ``eager``: a step outside any graph (``HashTableState.compacts``)."""
    if eager and fallback.numel():  # one pass fewer, no leading 0 (a size that graphs would guard on)
        both = fallback.to(torch.int64).add_(unplaced, alpha=1 << 32).cumsum_(0)
        # the running sum before each key's first position (0 before position 0)
        at = both.index_select(0, (key_offsets - 1).clamp_(min=0)).masked_fill_(key_offsets == 0, 0).diff()
        return at >> 32, at & 0xFFFFFFFF
    both = torch.zeros(fallback.numel() + 1, dtype=torch.int64, device=fallback.device)
    both.narrow(0, 1, fallback.numel()).copy_(fallback).add_(unplaced, alpha=1 << 32)
    both.cumsum_(0)
    at = both.index_select(0, key_offsets).diff()
    return at >> 32, at & 0xFFFFFFFF
