"""What the torch path of quantized embedding bags works out once per table layout and key
order, rather than once per forward: the *segments* (``quantized_torch.py``'s docstring says
what they are), each segment's cut into one segment per feature, the tables' row views, and a
block's per-table row shifts.

A small batch's forward is bound by per-call work, not by its ids: on a 2-core Xeon, in the
benchmark's interleaved regime, finding the segments (hashing the layout), cutting them and
making or finding two row views cost ~25 us of a ~200 us forward of the TorchRec tutorial's
two tables. A :class:`QuantPlan` holds all of it; the collection keeps one per key order,
and the op path one per layout (``plan_for``).
"""

from __future__ import annotations

import functools
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from jaggedrec.ops import quantized_rows
from jaggedrec.ops.feature_tables import STORAGE_FP16, FeatureTables


class Segment(NamedTuple):
    features: Tuple[int, ...]   # consecutive features, in the op's order
    keys: Tuple[int, ...]       # their keys, consecutive and increasing
    storage: int
    dim: int
    row_bytes: int
    start: int                  # first byte of the block (the type's tables of this dim) in its buffer
    num_rows: int               # rows of the block
    row_bases: Tuple[int, ...]  # per feature, its table's first row in the block
    table_rows: Tuple[int, ...]  # per feature, its table's rows
    mean: Tuple[bool, ...]      # per feature, MEAN pooling
    column: int                 # the first output column of its first feature
    one_table: bool             # every feature reads one table: ids index its own rows, unshifted
    packed: bool                # rows as torch's CPU quantized ops read them (INT8/INT4, no padding)


def segments(tables: FeatureTables) -> Tuple[Segment, ...]:
    """Neighbouring features that read neighbouring keys through tables of one storage type
    and dim, as segments."""
    blocks: Dict[Tuple[int, int], Tuple[int, int]] = {}  # (storage, dim) -> (first byte, end byte)
    for f in range(tables.num_features):
        key = (tables.storage[f], tables.dims[f])
        lo, hi = blocks.get(key, (tables.weight_offsets[f], 0))
        blocks[key] = (min(lo, tables.weight_offsets[f]),
                       max(hi, tables.weight_offsets[f] + tables.rows[f] * tables.row_bytes[f]))
    runs: List[List[int]] = []  # features of each segment
    for f in range(tables.num_features):
        last = runs[-1][-1] if runs else None
        if (last is not None and (tables.storage[last], tables.dims[last]) == (tables.storage[f], tables.dims[f])
                and tables.keys[f] == tables.keys[last] + 1):
            runs[-1].append(f)
        else:
            runs.append([f])
    out: List[Segment] = []
    for run in runs:
        f = run[0]
        storage, dim, stride = tables.storage[f], tables.dims[f], tables.row_bytes[f]
        start, end = blocks[storage, dim]
        for g in run:
            if (tables.weight_offsets[g] - start) % stride:
                raise ValueError(f"feature {g}: table offset {tables.weight_offsets[g]} is not row-aligned in the "
                                 f"block of dim-{dim} tables starting at byte {start}")
        bases = tuple((tables.weight_offsets[g] - start) // stride for g in run)
        out.append(Segment(tuple(run), tuple(tables.keys[g] for g in run), storage, dim, stride, start,
                           (end - start) // stride, bases, tuple(tables.rows[g] for g in run),
                           tuple(bool(tables.pooling[g]) for g in run), sum(tables.dims[:f]), len(set(bases)) == 1,
                           storage != STORAGE_FP16 and stride == quantized_rows.row_bytes(storage, dim)))
    return tuple(out)


def per_feature(seg: Segment) -> Tuple[Segment, ...]:
    """``seg`` cut into one segment per feature."""
    return tuple(Segment((f,), (k,), seg.storage, seg.dim, seg.row_bytes, seg.start, seg.num_rows, (base,), (rows,),
                         (mean,), seg.column + i * seg.dim, True, seg.packed)
                 for i, (f, k, base, rows, mean) in enumerate(zip(seg.features, seg.keys, seg.row_bases,
                                                                  seg.table_rows, seg.mean)))


class QuantPlan:
    """One layout's segments, their per-feature cuts, and the row views and row shifts the
    calls read, made on first use.

    Row views (``[rows, row_bytes]`` uint8, :meth:`rows`) are kept per storage type while its
    buffer is the same tensor at the same data pointer and size (:meth:`check_buffers`, once
    per forward): a buffer replaced (``.to()``, ``load_state_dict(assign=True)``) or whose
    storage moved (``set_``) gets new views, and views are dropped when their buffer dies
    (they would keep its memory alive).
    """

    def __init__(self, tables: FeatureTables) -> None:
        self.tables = tables
        self.segments = segments(tables)
        self.cuts = tuple(per_feature(seg) for seg in self.segments)
        self.storages = tuple(sorted({seg.storage for seg in self.segments}))
        # every segment the calls may use, by id (the plan holds them, so ids stay theirs)
        self._view_keys = {id(seg): _view_key(seg) for seg in (*self.segments, *(s for cut in self.cuts for s in cut))}
        # storage -> (weak reference to the buffer, its data pointer, its size, {view key: view})
        self._kept: Dict[int, Tuple[weakref.ref, int, int, Dict[Tuple[int, int, int], torch.Tensor]]] = {}
        self._bases: Dict[Tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        # quantized_torch's cut of the segments where it is the same for every batch, per cost model
        self.splits: Dict[Tuple, List[Segment]] = {}
        self.on_cpu = False  # the buffers of the last check_buffers all on the CPU
        # quantized_torch's direct calls for a fixed cut, per (cut, buffers on the CPU, probes)
        self.direct: Dict[Tuple, Optional[list]] = {}

    def check_buffers(self, buffers: Dict[int, torch.Tensor]) -> None:
        """Take ``buffers`` (storage type -> flat uint8 buffer) as the ones :meth:`rows` reads,
        keeping the views made of them before if they are still the same."""
        on_cpu = True
        for storage in self.storages:
            buffer = buffers[storage]
            on_cpu = on_cpu and buffer.is_cpu
            kept = self._kept.get(storage)
            if kept is None or kept[0]() is not buffer or kept[1] != buffer.data_ptr() or kept[2] != buffer.numel():
                self._kept[storage] = (weakref.ref(buffer, functools.partial(_forget, weakref.ref(self), storage)),
                                       buffer.data_ptr(), buffer.numel(), {})
        self.on_cpu = on_cpu

    def rows(self, seg: Segment) -> torch.Tensor:
        """``[rows, row_bytes]`` uint8: the rows ``seg``'s call reads (its one table, else its
        whole block) in the buffers of the last :meth:`check_buffers`."""
        kept = self._kept[seg.storage]
        key = self._view_keys[id(seg)]
        view = kept[3].get(key)
        if view is None:
            buffer = kept[0]()
            # of a detached alias: a view of the buffer itself would keep the buffer alive (its _base)
            view = kept[3][key] = buffer.detach().as_strided((key[1], key[2]), (key[2], 1),
                                                             buffer.storage_offset() + key[0])
        return view

    def __reduce__(self):
        # pickled and deep-copied as its layout alone: views and weak references stay behind
        return QuantPlan, (self.tables,)

    def forget(self, storage: int, dead: weakref.ref) -> None:
        """Drop ``storage``'s views if they are those of the buffer ``dead`` referred to."""
        kept = self._kept.get(storage)
        if kept is not None and kept[0] is dead:
            del self._kept[storage]

    def bases(self, seg: Segment, like: torch.Tensor) -> torch.Tensor:
        """``[keys]`` each feature's first row in the segment's block, in ``like``'s dtype and device."""
        key = (id(seg), like.dtype, like.device)
        kept = self._bases.get(key)
        if kept is None:
            kept = self._bases[key] = torch.tensor(seg.row_bases, dtype=like.dtype, device=like.device)
        return kept


def _view_key(seg: Segment) -> Tuple[int, int, int]:
    """(first byte, rows, row bytes) of the rows a call on ``seg`` reads."""
    first, rows = (seg.row_bases[0], seg.table_rows[0]) if seg.one_table else (0, seg.num_rows)
    return seg.start + first * seg.row_bytes, rows, seg.row_bytes


def _forget(plan: "weakref.ref[QuantPlan]", storage: int, dead: weakref.ref) -> None:
    """A buffer died: drop its views (and with them its memory), unless newer ones replaced them."""
    alive: Optional[QuantPlan] = plan()
    if alive is not None:
        alive.forget(storage, dead)


@functools.lru_cache(maxsize=256)
def plan_for(tables: FeatureTables) -> QuantPlan:
    """The plan of ``tables`` (for callers that hold no plan of their own)."""
    return QuantPlan(tables)
