"""Managed-collision modules with TorchRec's API (``torchrec.modules.mc_modules``).

A managed-collision module maps raw ids (any int64 below ``input_hash_size``) to rows
``[0, zch_size)`` of a table: each live raw id owns one row, and every ``eviction_interval``
training batches the ids seen since the last eviction compete with the live ones for rows under
an eviction policy (LFU, LRU, distance-weighted LFU).

The same constructor arguments, ``preprocess`` / ``profile`` / ``remap`` / ``evict`` /
``forward`` contract and state_dict keys as TorchRec's; the same rows for the same batches.
Unlike TorchRec's, ``profile`` and ``remap`` keep every piece of state in tensors of fixed shape
(no ``.item()``, no data-dependent shapes), so ``torch.compile(fullgraph=True)`` holds one graph
over batches that insert and evict; and ids that miss the table are counted (a tensor, read
without a sync) and, with ``unplaced="raise"``, raise naming the feature.

``ManagedCollisionCollection`` (one module per table over a KJT) lives in ``mc_collection.py``
and is importable from here, as TorchRec's is.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from jaggedrec.modules.mc_eviction import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHEvictionPolicy,
    MCHEvictionPolicyMetadataInfo,
    average_threshold_filter,
    dynamic_threshold_filter,
    probabilistic_threshold_filter,
)
from jaggedrec.modules.mc_collection import ManagedCollisionCollection
from jaggedrec.modules.mc_history import Coalesced, coalesce_history, select_replacements
from jaggedrec.sparse.jagged_tensor import JaggedTensor

__all__ = [
    "DistanceLFU_EvictionPolicy", "LFU_EvictionPolicy", "LRU_EvictionPolicy", "MCHEvictionPolicy",
    "MCHEvictionPolicyMetadataInfo", "ManagedCollisionCollection", "ManagedCollisionModule",
    "MCHManagedCollisionModule", "apply_mc_method_to_jt_dict", "average_threshold_filter",
    "dynamic_threshold_filter", "probabilistic_threshold_filter",
]

_INT64_MAX = torch.iinfo(torch.int64).max
_MAX_SEGMENTS = 1025  # room for 1024 row-wise shards, as TorchRec's checkpoints hold


def apply_mc_method_to_jt_dict(mc_module: nn.Module, method: str,
                               features_dict: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
    """Call ``mc_module.<method>(features_dict)``: the keys keep their order."""
    return getattr(mc_module, method)(features_dict)


class ManagedCollisionModule(nn.Module):
    """The contract of a managed-collision module: ids in ``[0, input_size())`` go to rows in
    ``[0, output_size())``. ``output_segments`` are the row boundaries of the shards this module
    can be rebuilt into (saved as ``_output_segments_tensor``, padded with -1)."""

    def __init__(self, device: torch.device, output_segments: List[int], skip_state_validation: bool = False,
                 read_only_suffix: str = "_readonly", enable_per_feature_lookups: bool = False) -> None:
        super().__init__()
        self._device = torch.device(device)
        self._enable_per_feature_lookups = enable_per_feature_lookups
        self._read_only_suffix = read_only_suffix
        if skip_state_validation:
            return
        if len(output_segments) > _MAX_SEGMENTS:
            raise ValueError(f"at most {_MAX_SEGMENTS - 1} row-wise shards, got {len(output_segments) - 1}")
        padded = list(output_segments) + [-1] * (_MAX_SEGMENTS - len(output_segments))
        self.register_buffer("_output_segments_tensor", torch.tensor(padded, dtype=torch.int64, device=self._device))
        self.register_buffer("_current_iter_tensor", torch.zeros(1, dtype=torch.int64, device=self._device))
        self.register_load_state_dict_post_hook(lambda module, _keys: module.validate_state())

    @property
    def readable_suffix(self) -> str:
        return self._read_only_suffix

    @property
    def device(self) -> torch.device:
        return self._device

    @abc.abstractmethod
    def preprocess(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]: ...

    @abc.abstractmethod
    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]: ...

    @abc.abstractmethod
    def remap(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True,
              write_weights: Optional[torch.Tensor] = None) -> Dict[str, JaggedTensor]: ...

    @abc.abstractmethod
    def evict(self) -> Optional[torch.Tensor]:
        """The rows whose ids were replaced since the last call (None when none were)."""

    @abc.abstractmethod
    def forward(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True
                ) -> Dict[str, JaggedTensor]: ...

    @abc.abstractmethod
    def output_size(self) -> int: ...

    @abc.abstractmethod
    def input_size(self) -> int: ...

    @abc.abstractmethod
    def buckets(self) -> int: ...

    @abc.abstractmethod
    def validate_state(self) -> None: ...

    @abc.abstractmethod
    def open_slots(self) -> torch.Tensor: ...

    @abc.abstractmethod
    def rebuild_with_output_id_range(self, output_id_range: Tuple[int, int], output_segments: List[int],
                                     device: Optional[torch.device] = None) -> "ManagedCollisionModule": ...


class MCHManagedCollisionModule(ManagedCollisionModule):
    """Zero-collision hashing over a sorted buffer of ``zch_size`` raw ids.

    ``_mch_sorted_raw_ids [zch_size]`` holds the live raw ids in ascending order (free slots hold
    int64 max); ``_mch_remapped_ids_mapping [zch_size]`` the row of each; the last row
    (``output_global_offset + zch_size - 1``) is never given out: ids that are not live read it.
    In training, ``profile`` writes each batch's ids into a history of fixed size (1.25x the first
    batch's ids times ``eviction_interval``; ids past it are dropped, as TorchRec drops them) and
    every ``eviction_interval`` batches replaces live ids by new ones where the policy ranks the
    new ones higher; ``remap`` is a ``searchsorted``.

    ``unplaced``: ``"fallback"`` (TorchRec's behaviour) sends ids that are not live to the last
    row; ``"raise"`` raises (RuntimeError naming the feature) when a batch has such ids, through
    ``torch._assert_async`` (no host sync on GPU). Either way :meth:`unplaced_count` counts them.
    """

    def __init__(self, zch_size: int, device: torch.device, eviction_policy: MCHEvictionPolicy,
                 eviction_interval: int, input_hash_size: int = (2**63) - 1,
                 input_hash_func: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                 mch_size: Optional[int] = None,
                 mch_hash_func: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                 name: Optional[str] = None, output_global_offset: int = 0,
                 output_segments: Optional[List[int]] = None, buckets: int = 1, unplaced: str = "fallback") -> None:
        if zch_size <= 0:
            raise ValueError(f"MCHManagedCollisionModule {name}: zch_size must be > 0, got {zch_size}")
        if eviction_interval <= 0:
            raise ValueError(f"MCHManagedCollisionModule {name}: eviction_interval must be > 0, got {eviction_interval}")
        if unplaced not in ("fallback", "raise"):
            raise ValueError(f"MCHManagedCollisionModule {name}: unplaced must be 'fallback' or 'raise', got {unplaced!r}")
        del mch_size, mch_hash_func  # TorchRec deprecated the residual hash table and ignores them too
        if output_segments is None:
            output_segments = [output_global_offset, output_global_offset + zch_size]
        super().__init__(device=device, output_segments=output_segments)
        self._init_output_segments_tensor = self._output_segments_tensor.clone()
        self._name = name
        self._zch_size = zch_size
        self._input_hash_size = input_hash_size
        self._input_hash_func = input_hash_func
        self._output_global_offset = output_global_offset
        self._eviction_interval = eviction_interval
        self._eviction_policy = eviction_policy
        self._buckets = buckets
        self._unplaced = unplaced
        dev = self._device
        self.register_buffer("_mch_sorted_raw_ids", torch.full((zch_size,), _INT64_MAX, dtype=torch.int64, device=dev))
        self.register_buffer("_mch_remapped_ids_mapping", torch.arange(
            output_global_offset, output_global_offset + zch_size, dtype=torch.int64, device=dev))
        self._mch_metadata: Dict[str, torch.Tensor] = {}
        for info in eviction_policy.metadata_info:
            if info.is_mch_metadata:
                self.register_buffer("_mch_" + info.metadata_name, torch.zeros(zch_size, dtype=torch.int64, device=dev))
                self._mch_metadata[info.metadata_name] = getattr(self, "_mch_" + info.metadata_name)
        # iteration of the last eviction, history fill and counters: tensors, so that profile never
        # reads them on the host (not saved: TorchRec's checkpoints do not hold them either)
        for buf in ("_last_eviction_iter", "_history_offset", "_unplaced_count"):
            self.register_buffer(buf, torch.zeros(1, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("_evicted_mask", torch.zeros(zch_size, dtype=torch.bool, device=dev), persistent=False)
        self._history_size = -1
        self._history_accumulator = torch.empty(0, dtype=torch.int64, device=dev)
        self._history_iter = torch.empty(0, dtype=torch.int64, device=dev)
        self._since_eviction: Optional[int] = 0  # eager mirror of iter - last eviction; None: unknown
        self._evicted = False

    # --- the contract ------------------------------------------------------------------------
    def preprocess(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        if self._input_hash_func is None:
            return features
        return {name: JaggedTensor(values=self._input_hash_func(jt.values(), self._input_hash_size),
                                   lengths=jt.lengths(), offsets=jt.offsets(), weights=jt.weights_or_none())
                for name, jt in features.items()}

    @torch.no_grad()
    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        """Record the batch's ids (training only); evict every ``eviction_interval`` batches."""
        if not self.training:
            return features
        if self._history_size < 0:
            self.init_history(sum(jt.values().numel() for jt in features.values()))
        self._current_iter_tensor.add_(1)
        for jt in features.values():
            self._record(jt.values())
        if torch.compiler.is_compiling():
            # the decision stays on the device: both outcomes are computed and one is kept
            due = (self._current_iter_tensor - self._last_eviction_iter) == self._eviction_interval
            self._coalesce(due)
            self._since_eviction = None
            self._evicted = True
        else:
            if self._since_eviction is None:  # resynchronise once after compiled calls or a load
                self._since_eviction = int(self._current_iter_tensor - self._last_eviction_iter) - 1
            self._since_eviction += 1
            if self._since_eviction == self._eviction_interval:
                self._coalesce(None)
                self._since_eviction = 0
                self._evicted = True
        return features

    def remap(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True,
              write_weights: Optional[torch.Tensor] = None) -> Dict[str, JaggedTensor]:
        """Each id's row: ``[N]`` values in, ``[N]`` rows out (the values' dtype), lengths kept."""
        fallback = self._output_global_offset + self._zch_size - 1
        return _remap_dict(features, self._mch_sorted_raw_ids, self._mch_remapped_ids_mapping, fallback,
                           self._unplaced_count, self._name if self._unplaced == "raise" else None)

    def forward(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True
                ) -> Dict[str, JaggedTensor]:
        return self.remap(self.profile(self.preprocess(features)))

    @torch.no_grad()
    def evict(self) -> Optional[torch.Tensor]:
        """The rows (ascending) whose ids were replaced since the last call, or None."""
        if not self._evicted:
            return None
        self._evicted = False
        rows = torch.sort(self._mch_remapped_ids_mapping[self._evicted_mask]).values
        self._evicted_mask.zero_()
        return rows

    def output_size(self) -> int:
        return self._zch_size

    def input_size(self) -> int:
        return self._input_hash_size

    def buckets(self) -> int:
        return self._buckets

    def bucket_segments(self) -> List[int]:
        """The ``buckets() + 1`` row edges of the buckets a sharded table keeps apart: an even
        split of ``[output_global_offset, + zch_size)`` (sizes differ by at most one row)."""
        k, start = self._buckets, self._output_global_offset
        return [start + self._zch_size * i // k for i in range(k + 1)]

    def bucket_of(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 ids (after ``preprocess``) -> ``[N]`` bucket: blocks of
        ``ceil(input_hash_size / buckets())`` ids, as TorchRec routes them; outside
        ``[0, buckets())`` for ids outside ``[0, input_hash_size)`` (with one bucket, always 0)."""
        if self._buckets == 1:
            return torch.zeros_like(ids)
        block = -(-self._input_hash_size // self._buckets)
        return torch.where(ids < 0, -1, ids // block)

    def row_state_names(self) -> List[str]:
        """The state_dict entries indexed by slot (``[zch_size]``): a row-wise shard holds its block."""
        return ["_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"] + ["_mch_" + n for n in self._mch_metadata]

    def open_slots(self) -> torch.Tensor:
        """``[1]`` rows still free (the fallback row not counted)."""
        live = (self._mch_sorted_raw_ids != _INT64_MAX).sum().reshape(1)
        return (self._zch_size - 1) - live

    def unplaced_count(self) -> torch.Tensor:
        """``[1]`` int64: ids remapped to the fallback row since construction (or the last reset)."""
        return self._unplaced_count

    def reset_inference_mode(self) -> None:
        self._evicted = False
        self._since_eviction = None

    def validate_state(self) -> None:
        start, end = self._output_global_offset, self._output_global_offset + self._zch_size
        if not (bool((self._output_segments_tensor == start).any()) and bool((self._output_segments_tensor == end).any())):
            raise ValueError(f"MCHManagedCollisionModule {self._name}: rows [{start}, {end}) are not a union of "
                             f"the saved segments {self._output_segments_tensor[self._output_segments_tensor >= 0].tolist()}")
        self._output_segments_tensor = self._init_output_segments_tensor.clone()
        self._last_eviction_iter.copy_(self._current_iter_tensor)
        self._since_eviction = None
        self._sort_buffers()

    def rebuild_with_output_id_range(self, output_id_range: Tuple[int, int], output_segments: List[int],
                                     device: Optional[torch.device] = None) -> "MCHManagedCollisionModule":
        return type(self)(name=self._name, zch_size=output_id_range[1] - output_id_range[0],
                          device=device or self.device, eviction_policy=self._eviction_policy,
                          eviction_interval=self._eviction_interval, input_hash_size=self._input_hash_size,
                          input_hash_func=self._input_hash_func, output_global_offset=output_id_range[0],
                          output_segments=output_segments, buckets=len(output_segments) - 1, unplaced=self._unplaced)

    # --- the machinery --------------------------------------------------------------------------
    def init_history(self, ids_per_batch: int) -> None:
        """Size the history for batches of ``ids_per_batch`` ids (profile does this on its first
        batch; call it before compiling to keep the allocation out of the graph)."""
        self._history_size = max(1, int(ids_per_batch * self._eviction_interval * 1.25))
        self._history_accumulator = torch.full((self._history_size,), _INT64_MAX, dtype=torch.int64, device=self._device)
        self._history_iter = torch.zeros(self._history_size, dtype=torch.int64, device=self._device)
        self._history_offset.zero_()

    def _record(self, values: torch.Tensor) -> None:
        n = values.numel()
        pos = self._history_offset + torch.arange(n, device=values.device)
        # ids past the end go to a scratch slot and are dropped
        pos = torch.where(pos < self._history_size, pos, self._history_size)
        hist = torch.cat([self._history_accumulator, self._history_accumulator.new_zeros(1)])
        hist.index_put_((pos,), values.to(torch.int64))
        self._history_accumulator.copy_(hist[:-1])
        it = torch.cat([self._history_iter, self._history_iter.new_zeros(1)])
        it.index_put_((pos,), self._current_iter_tensor.expand(n))
        self._history_iter.copy_(it[:-1])
        self._history_offset.copy_(torch.clamp(self._history_offset + n, max=self._history_size))

    def _coalesce(self, due: Optional[torch.Tensor]) -> None:
        """Replace live ids by the history's where the policy says so; ``due`` (a ``[1]`` bool on
        the device) keeps the old state when false; None: always apply."""
        hist: Coalesced = coalesce_history(self._history_accumulator, self._history_iter, self._history_offset,
                                           self._eviction_policy.threshold_filtering_func)
        state = {"ids": self._mch_sorted_raw_ids, **self._mch_metadata}
        new_state, evicted = select_replacements(self._eviction_policy, self._current_iter_tensor, state, hist,
                                                 self._zch_size)
        if due is not None:
            new_state = {k: torch.where(due, v, state[k]) for k, v in new_state.items()}
            evicted = evicted & due
            self._last_eviction_iter.copy_(torch.where(due, self._current_iter_tensor, self._last_eviction_iter))
            self._history_offset.copy_(torch.where(due, 0, self._history_offset))
        else:
            self._last_eviction_iter.copy_(self._current_iter_tensor)
            self._history_offset.zero_()
        self._evicted_mask.logical_or_(evicted)
        for k, v in new_state.items():
            state[k].copy_(v)
        self._sort_buffers()

    def _sort_buffers(self) -> None:
        order = torch.argsort(self._mch_sorted_raw_ids, stable=True)
        for buf in (self._mch_sorted_raw_ids, self._mch_remapped_ids_mapping, self._evicted_mask,
                    *self._mch_metadata.values()):
            buf.copy_(buf[order])


def _lookup(sorted_ids: torch.Tensor, mapping: torch.Tensor, ids: torch.Tensor, fallback: int
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` int64 ids -> (``[N]`` rows, ``[N]`` bool: the id is live)."""
    at = torch.searchsorted(sorted_ids[:-1], ids)
    hit = sorted_ids[at] == ids
    return torch.where(hit, mapping[at], fallback), hit


def _remap_dict(features: Dict[str, JaggedTensor], sorted_ids: torch.Tensor, mapping: torch.Tensor, fallback: int,
                unplaced_count: torch.Tensor, raise_for: Optional[str]) -> Dict[str, JaggedTensor]:
    """Each feature's JaggedTensor of rows (``[N]`` values in the ids' dtype); adds the misses to
    ``unplaced_count`` and, when ``raise_for`` names the module, asserts there are none."""
    out: Dict[str, JaggedTensor] = {}
    for name, jt in features.items():
        values = jt.values()
        rows, hit = _lookup(sorted_ids, mapping, values.to(torch.int64), fallback)
        misses = (~hit).sum().reshape(1)
        unplaced_count.add_(misses)
        if raise_for is not None:
            torch._assert_async((misses == 0).all(), f"MCHManagedCollisionModule {raise_for}: feature {name} has ids "
                                f"with no row of their own (unplaced='raise'); unplaced_count() counts them")
        out[name] = JaggedTensor(values=rows.to(values.dtype), lengths=jt.lengths(), offsets=jt.offsets(),
                                 weights=jt.weights_or_none())
    return out


# a leaf for torch.fx (TorchRec's tracer): it builds JaggedTensors
torch.fx.wrap("_remap_dict")
