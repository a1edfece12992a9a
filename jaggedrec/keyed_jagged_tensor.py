"""``KeyedJaggedTensor``: several jagged features over one batch, with TorchRec's API.

The tensors are the only required state; everything read back to the host
(``length_per_key``, ``offset_per_key``) is computed on first use and cached, and nothing on
the module's forward path needs it, so the GPU never waits on the host there.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.utils._pytree as pytree
from torch._dynamo.decorators import mark_unbacked, maybe_mark_dynamic

from .jagged_tensor import (JAGGED_FIELDS, JaggedTensor, _check_integer, _feature_string, flatten_with_keys_fn,
                            lengths_to_offsets, offsets_to_lengths)

def _mark_dynamic(ids: Sequence[Optional[torch.Tensor]], bags: Sequence[Optional[torch.Tensor]]) -> None:
    """Tell torch.compile, before it first sees a batch, which sizes change between batches.

    ``ids`` (``[N]`` values and weights) become unbacked: the graph serves every N, 0 and 1
    included, with no guard on it, where a plain dynamic size would be specialised (and the
    graph recompiled) for batches of 0 or 1 ids. Only the op reads N, and it never branches
    on it. ``bags`` (``[K*B]`` lengths, ``[K*B+1]`` offsets) become dynamic but stay backed,
    so that user code may treat the batch size as any other size; B=1 then gets its own
    graph, as it would for any dense input.
    """
    if torch.compiler.is_compiling():
        return  # tensors made inside a graph are already symbolic
    for t in ids:
        if t is not None:
            mark_unbacked(t, 0)
    for t in bags:
        if t is not None:
            maybe_mark_dynamic(t, 0)


@dataclasses.dataclass(init=False, repr=False, eq=False)
class KeyedJaggedTensor:
    """Several jagged features over one batch, stored key-major.

    For keys ``["f0", "f1"]`` and batch size ``B = 3``::

                  b=0       b=1    b=2
        "f0"    [V0, V1]    []     [V2]
        "f1"    [V3]        [V4]   [V5, V6, V7]

        values  = [V0, V1, V2, V3, V4, V5, V6, V7]   # [N]
        lengths = [2, 0, 1, 1, 1, 3]                 # [K*B], all of f0, then all of f1
        offsets = [0, 2, 2, 3, 4, 5, 8]              # [K*B+1]

    Args:
        keys: the K feature names.
        values: ``[N]`` ids, key-major.
        weights: optional ``[N]`` per-id weights.
        lengths: ``[K*B]`` ids per (key, sample); or give ``offsets``.
        offsets: ``[K*B+1]``; or give ``lengths``.
        stride: B. Derived from the lengths' or offsets' shape when missing.
    """

    _keys: List[str]
    _values: torch.Tensor
    _weights: Optional[torch.Tensor]
    _lengths: Optional[torch.Tensor]
    _offsets: Optional[torch.Tensor]
    _stride: int
    _length_per_key: Optional[List[int]] = None
    _offset_per_key: Optional[List[int]] = None
    _index_per_key: Optional[Dict[str, int]] = None
    # the offsets are known to agree with the lengths: derived from them here, or checked
    _offsets_agree: bool = False

    def __init__(self, keys: List[str], values: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 lengths: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                 stride: Optional[int] = None, length_per_key: Optional[List[int]] = None,
                 offset_per_key: Optional[List[int]] = None,
                 index_per_key: Optional[Dict[str, int]] = None) -> None:
        _check_integer(lengths, "lengths", "KeyedJaggedTensor")
        _check_integer(offsets, "offsets", "KeyedJaggedTensor")
        self._keys = list(keys)
        self._values, self._weights, self._lengths, self._offsets = values, weights, lengths, offsets
        _mark_dynamic((values, weights), (lengths, offsets))
        if stride is None:
            if not self._keys:
                stride = 0
            elif lengths is not None:
                stride = lengths.numel() // len(self._keys)
            elif offsets is not None:
                stride = (offsets.numel() - 1) // len(self._keys)
            else:
                raise ValueError("KeyedJaggedTensor with keys needs lengths or offsets")
        self._stride = stride
        self._length_per_key = length_per_key
        self._offset_per_key = offset_per_key
        self._index_per_key = index_per_key
        self._offsets_agree = False

    # --- construction -------------------------------------------------------------
    @staticmethod
    def from_lengths_sync(keys: List[str], values: torch.Tensor, lengths: torch.Tensor,
                          weights: Optional[torch.Tensor] = None, stride: Optional[int] = None) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, weights, lengths=lengths, stride=stride).sync()

    @staticmethod
    def from_offsets_sync(keys: List[str], values: torch.Tensor, offsets: torch.Tensor,
                          weights: Optional[torch.Tensor] = None, stride: Optional[int] = None) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, weights, offsets=offsets, stride=stride).sync()

    @staticmethod
    def from_jt_dict(jt_dict: Dict[str, JaggedTensor]) -> "KeyedJaggedTensor":
        """Stack per-feature JaggedTensors of one batch size into a KJT, keys in dict order."""
        keys = list(jt_dict)
        jts = list(jt_dict.values())
        strides = {jt.lengths().numel() for jt in jts}
        if len(strides) > 1:
            raise ValueError(f"from_jt_dict: features have different batch sizes {sorted(strides)}")
        weighted = {jt.weights_or_none() is not None for jt in jts}
        if len(weighted) > 1:
            raise ValueError("from_jt_dict: either all features have weights or none do")
        weights = torch.cat([jt.weights() for jt in jts]) if weighted == {True} else None
        return KeyedJaggedTensor(keys, torch.cat([jt.values() for jt in jts]), weights,
                                 lengths=torch.cat([jt.lengths() for jt in jts]),
                                 stride=strides.pop() if strides else 0,
                                 length_per_key=[jt.values().numel() for jt in jts])

    @staticmethod
    def empty(is_weighted: bool = False, device: Optional[torch.device] = None) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor([], torch.empty(0, dtype=torch.long, device=device),
                                 torch.empty(0, device=device) if is_weighted else None,
                                 lengths=torch.empty(0, dtype=torch.long, device=device), stride=0)

    @staticmethod
    def concat(kjt_list: List["KeyedJaggedTensor"]) -> "KeyedJaggedTensor":
        """Join KJTs of one batch size into one whose keys are all of theirs, in order."""
        if not kjt_list:
            raise ValueError("concat needs at least one KeyedJaggedTensor")
        strides = {kjt.stride() for kjt in kjt_list}
        if len(strides) > 1:
            raise ValueError(f"concat: KJTs have different strides {sorted(strides)}")
        weighted = {kjt.weights_or_none() is not None for kjt in kjt_list}
        if len(weighted) > 1:
            raise ValueError("concat: either all KJTs have weights or none do")
        return KeyedJaggedTensor(
            [k for kjt in kjt_list for k in kjt.keys()],
            torch.cat([kjt.values() for kjt in kjt_list]),
            torch.cat([kjt.weights() for kjt in kjt_list]) if weighted == {True} else None,
            lengths=torch.cat([kjt.lengths() for kjt in kjt_list]), stride=strides.pop(),
            length_per_key=[n for kjt in kjt_list for n in kjt.length_per_key()])

    # --- accessors ----------------------------------------------------------------
    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("this KeyedJaggedTensor has no weights")
        return self._weights

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def lengths(self) -> torch.Tensor:
        """``[K*B]`` ids per (key, sample)."""
        if self._lengths is None:
            self._lengths = offsets_to_lengths(self._offsets)
            _mark_dynamic((), (self._lengths,))
        return self._lengths

    def offsets(self) -> torch.Tensor:
        """``[K*B+1]`` start of each (key, sample) bag in ``values``."""
        if self._lengths is not None and torch.compiler.is_compiling():
            # Derived in the graph and not cached: the graph then reads only the lengths, whatever
            # an eager call cached, and leaves the KJT as it found it, so reusing it can't recompile.
            return lengths_to_offsets(self._lengths)
        if self._offsets is None:
            self._offsets = lengths_to_offsets(self._lengths)
            self._offsets_agree = True
            _mark_dynamic((), (self._offsets,))  # cached: a compiled graph may see it as an input
        return self._offsets

    def _lookup_offsets(self) -> torch.Tensor:
        """``[K*B+1]`` the offsets the embedding modules pool with: those of the lengths whenever
        the KJT has lengths. A compiled graph reads only the lengths (see :meth:`offsets`), so
        eager code must too, or a KJT given lengths and offsets that disagree would give two
        answers. Offsets given beside the lengths serve once validation has found that they
        agree (``validate=True``; see :meth:`_mark_offsets_checked`)."""
        # compiling: no look at the cached offsets, which would guard the graph on their presence
        if self._lengths is not None and (torch.compiler.is_compiling() or self._offsets_unchecked()):
            return lengths_to_offsets(self._lengths)  # not cached: the caller's offsets stay as given
        return self.offsets()

    def _offsets_unchecked(self) -> bool:
        """The caller gave both lengths and offsets, which may disagree: validation compares them."""
        return self._lengths is not None and self._offsets is not None and not self._offsets_agree

    def _mark_offsets_checked(self) -> None:
        self._offsets_agree = True

    def lengths_or_none(self) -> Optional[torch.Tensor]:
        return self._lengths

    def offsets_or_none(self) -> Optional[torch.Tensor]:
        return self._offsets

    def stride(self) -> int:
        """B. While compiling it is read off the lengths' (or offsets') size, so that it is the
        tensors' own symbol rather than a second, separately guarded int."""
        if self._keys and torch.compiler.is_compiling():
            bags = self._lengths.shape[0] if self._lengths is not None else self._offsets.shape[0] - 1
            return bags // len(self._keys)
        return self._stride

    def device(self) -> torch.device:
        return self._values.device

    def sync(self) -> "KeyedJaggedTensor":
        """Read the per-key sizes to the host now, so later splits don't wait."""
        self.offset_per_key()
        return self

    def length_per_key(self) -> List[int]:
        """Number of ids of each key (read from the device once, then cached)."""
        if self._length_per_key is None:
            if self._keys:
                per_key = self.lengths().view(len(self._keys), self._stride).sum(1)
                self._length_per_key = per_key.tolist()
            else:
                self._length_per_key = []
        return self._length_per_key

    def offset_per_key(self) -> List[int]:
        """``[K+1]`` start of each key's ids in ``values``."""
        if self._offset_per_key is None:
            offsets = [0]
            for n in self.length_per_key():
                offsets.append(offsets[-1] + n)
            self._offset_per_key = offsets
        return self._offset_per_key

    def index_per_key(self) -> Dict[str, int]:
        if self._index_per_key is None:
            self._index_per_key = {key: i for i, key in enumerate(self._keys)}
        return self._index_per_key

    # --- views per key --------------------------------------------------------------
    def __getitem__(self, key: str) -> JaggedTensor:
        if key not in self.index_per_key():
            raise KeyError(f"feature '{key}' is not in this KeyedJaggedTensor (keys: {self._keys})")
        k = self.index_per_key()[key]
        start, end = self.offset_per_key()[k], self.offset_per_key()[k + 1]
        lengths = self.lengths()[k * self._stride:(k + 1) * self._stride]
        return JaggedTensor(self._values[start:end],
                            None if self._weights is None else self._weights[start:end],
                            lengths=lengths, offsets=lengths_to_offsets(lengths))

    def to_dict(self) -> Dict[str, JaggedTensor]:
        return {key: self[key] for key in self._keys}

    def permute(self, indices: List[int], indices_tensor: Optional[torch.Tensor] = None) -> "KeyedJaggedTensor":
        """A KJT whose key ``i`` is this one's key ``indices[i]`` (keys may repeat or drop)."""
        del indices_tensor  # accepted for TorchRec compatibility; the host list is enough here
        starts, length_per_key = self.offset_per_key(), self.length_per_key()
        pieces = lambda t: [t[starts[i]:starts[i + 1]] for i in indices]  # noqa: E731
        lengths = self.lengths().view(len(self._keys), self._stride)[list(indices)].reshape(-1)
        return KeyedJaggedTensor(
            [self._keys[i] for i in indices], _cat_or_empty(pieces(self._values), self._values),
            None if self._weights is None else _cat_or_empty(pieces(self._weights), self._weights),
            lengths=lengths, stride=self._stride, length_per_key=[length_per_key[i] for i in indices])

    def split(self, segments: Sequence[int]) -> List["KeyedJaggedTensor"]:
        """Split into KJTs of ``segments[i]`` consecutive keys each."""
        if sum(segments) != len(self._keys):
            raise ValueError(f"split: segments {list(segments)} do not add up to {len(self._keys)} keys")
        out, first = [], 0
        starts = self.offset_per_key()
        for size in segments:
            last = first + size
            lo, hi = starts[first], starts[last]
            out.append(KeyedJaggedTensor(
                self._keys[first:last], self._values[lo:hi],
                None if self._weights is None else self._weights[lo:hi],
                lengths=self.lengths()[first * self._stride:last * self._stride], stride=self._stride,
                length_per_key=self.length_per_key()[first:last]))
            first = last
        return out

    # --- movement -------------------------------------------------------------------
    def _map(self, fn) -> "KeyedJaggedTensor":
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        kjt = KeyedJaggedTensor(self._keys, fn(self._values), opt(self._weights), opt(self._lengths),
                                opt(self._offsets), self._stride, self._length_per_key,
                                self._offset_per_key, self._index_per_key)
        kjt._offsets_agree = self._offsets_agree
        return kjt

    def to(self, device: torch.device, non_blocking: bool = False) -> "KeyedJaggedTensor":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "KeyedJaggedTensor":
        return self._map(lambda t: t.pin_memory())

    def __str__(self) -> str:
        if not self._keys:
            return "KeyedJaggedTensor()\n"
        offsets, stride = self.offsets().tolist(), self._stride
        rows = [f'    "{key}": ' + _feature_string(self._values, self._weights, offsets,
                                                     k * stride, (k + 1) * stride, "    ")
                for k, key in enumerate(self._keys)]
        return "KeyedJaggedTensor({\n" + ",\n".join(rows) + "\n})\n"


def _cat_or_empty(pieces: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(pieces) if pieces else like[:0]


# --- pytree: lets torch.compile and torch.export take KJTs as inputs and outputs -------------
# Only tensors are leaves. The batch size is not context: it is re-derived from the
# lengths' shape, so that a new batch size is a new shape, not a new graph.

def _kjt_flatten(kjt: KeyedJaggedTensor):
    return [kjt._values, kjt._weights, kjt._lengths, kjt._offsets], list(kjt._keys)


def _kjt_unflatten(children, keys) -> KeyedJaggedTensor:
    values, weights, lengths, offsets = children
    return KeyedJaggedTensor(keys, values, weights, lengths=lengths, offsets=offsets)


pytree.register_pytree_node(KeyedJaggedTensor, _kjt_flatten, _kjt_unflatten,
                            serialized_type_name="jaggedrec.KeyedJaggedTensor",
                            flatten_with_keys_fn=flatten_with_keys_fn(_kjt_flatten, JAGGED_FIELDS))
torch.serialization.add_safe_globals([KeyedJaggedTensor])
