"""``KeyedJaggedTensor``: several jagged features over one batch, with TorchRec's API.

The tensors are the only required state; everything read back to the host
(``length_per_key``, ``offset_per_key``) is computed on first use and cached, and nothing on
the module's forward path needs it, so the GPU never waits on the host there.

This file holds the dataclass: its fields, construction, the tensors and their per-key views.
It imports the modules that hold the rest of its methods, and none of them imports it back:
``_kjt_metadata.py`` (the host metadata: batch sizes, VBE, ids per key, a mixin),
``_kjt_ops.py`` (permute, split, concat and the other KJTs-from-KJTs builders the methods
delegate to, and copy_'s checks) and ``_kjt_dist.py`` (the input all-to-all's dist_* methods).
``_kjt_pytree.py`` imports this one to register the class as a pytree node.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from jaggedrec.sparse import _kjt_dist as _dist
from jaggedrec.sparse import _kjt_ops as _ops
from jaggedrec.sparse._jagged import (JaggedTensor, JaggedTensorMeta, _check_integer, _feature_string,
                                      lengths_to_offsets, mark_dynamic_sizes, offsets_to_lengths, size_in_bytes)
from jaggedrec.sparse._kjt_metadata import KJTMetadata

# The builders the methods delegate to are looked up as ``_ops.name`` when called, which is also
# where torch.fx.wrap swaps in their graph nodes while tracing.


@dataclasses.dataclass(init=False, repr=False, eq=False)
class KeyedJaggedTensor(KJTMetadata, metaclass=JaggedTensorMeta):
    """Several jagged features over one batch, stored key-major.

    For keys ``["f0", "f1"]`` and batch size ``B = 3``::

                  b=0       b=1    b=2
        "f0"    [V0, V1]    []     [V2]
        "f1"    [V3]        [V4]   [V5, V6, V7]

        values  = [V0, V1, V2, V3, V4, V5, V6, V7]   # [N]
        lengths = [2, 0, 1, 1, 1, 3]                 # [K*B], all of f0, then all of f1
        offsets = [0, 2, 2, 3, 4, 5, 8]              # [K*B+1]

    **Variable batch per feature (VBE).** With ``stride_per_key_per_rank``, key ``k`` has its
    own number of bags ``B_k = sum(stride_per_key_per_rank[k])`` (one entry per rank that sent
    them; one rank outside distributed code), so that a feature shared by many samples (the
    user of a batch of one user's impressions) is sent once per distinct value. Lengths are
    then ``[sum(B_k)]``, key-major. ``inverse_indices = (keys, [K', B] tensor)`` maps each of
    the ``B`` samples to its bag of each key, and an EmbeddingBagCollection expands its output
    to the full batch through it. For ``f0`` with 2 distinct bags serving a batch of 3::

        "f0"    [V0, V1]    [V2]          stride_per_key_per_rank = [[2], [3]]
        "f1"    [V3]        [V4]   [V5]   inverse_indices = (["f0", "f1"], [[0, 1, 0], [0, 1, 2]])

    Args:
        keys: the K feature names.
        values: ``[N]`` ids, key-major.
        weights: optional ``[N]`` per-id weights.
        lengths: ``[K*B]`` ids per (key, sample) (VBE: ``[sum(B_k)]``); or give ``offsets``.
        offsets: ``[K*B+1]``; or give ``lengths``.
        stride: B. Derived when missing: from the lengths' or offsets' shape, and for VBE from
            the inverse indices' width, else the largest ``B_k``.
        stride_per_key_per_rank: ``[K][R]`` bags of each key from each rank (a list or an int
            tensor): makes the KJT VBE.
        inverse_indices: ``(keys, [K', B] int tensor)``, sample -> bag, per key.
        stride_per_key, length_per_key, offset_per_key, lengths_offset_per_key, index_per_key:
            host metadata already known to the caller (else derived on first use).
    """

    _keys: List[str]
    _values: torch.Tensor
    _weights: Optional[torch.Tensor]
    _lengths: Optional[torch.Tensor]
    _offsets: Optional[torch.Tensor]
    _stride: Optional[int]
    # VBE: [K, R] int32 on the host, kept as given (TorchRec's validator reads it as given)
    _stride_per_key_per_rank: Optional[torch.Tensor]
    _inverse_indices: Optional[Tuple[List[str], torch.Tensor]]
    _stride_per_key: Optional[List[int]] = None
    _lengths_offset_per_key: Optional[List[int]] = None
    _length_per_key: Optional[List[int]] = None
    _offset_per_key: Optional[List[int]] = None
    _index_per_key: Optional[Dict[str, int]] = None
    # the offsets are known to agree with the lengths: derived from them here, or checked
    _offsets_agree: bool = False
    # TorchRec's cache of to_dict(), which its helpers (ComputeKJTToJTDict) read; never filled
    # here, where to_dict() makes views
    _jt_dict: Optional[Dict[str, JaggedTensor]] = None

    def __init__(self, keys: List[str], values: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 lengths: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                 stride: Optional[int] = None,
                 stride_per_key_per_rank: Optional[Union[torch.Tensor, List[List[int]]]] = None,
                 stride_per_key: Optional[List[int]] = None, length_per_key: Optional[List[int]] = None,
                 lengths_offset_per_key: Optional[List[int]] = None, offset_per_key: Optional[List[int]] = None,
                 index_per_key: Optional[Dict[str, int]] = None, jt_dict: Optional[Dict[str, JaggedTensor]] = None,
                 inverse_indices: Optional[Tuple[List[str], torch.Tensor]] = None) -> None:
        del jt_dict  # TorchRec's cache of to_dict(); to_dict() here is cheap views
        _check_integer(lengths, "lengths", "KeyedJaggedTensor")
        _check_integer(offsets, "offsets", "KeyedJaggedTensor")
        self._keys = list(keys)
        self._values, self._weights, self._lengths, self._offsets = values, weights, lengths, offsets
        mark_dynamic_sizes((values, weights), (lengths, offsets))
        if isinstance(stride_per_key_per_rank, (list, tuple)):
            if stride_per_key is None and all(isinstance(r, (list, tuple)) for r in stride_per_key_per_rank):
                stride_per_key = [sum(r) for r in stride_per_key_per_rank]  # known here: no read back
            stride_per_key_per_rank = torch.tensor(stride_per_key_per_rank, dtype=torch.int32)
        self._stride_per_key_per_rank = stride_per_key_per_rank
        self._inverse_indices = inverse_indices
        if stride is None and stride_per_key_per_rank is None:
            # from shapes only, never from data; a KJT of no lengths nor offsets has no bags
            # (its lengths() says so when asked: TorchRec builds such KJTs for its validator)
            if self._keys and lengths is not None:
                stride = lengths.numel() // len(self._keys)
            elif self._keys and offsets is not None and offsets.numel() > 0:
                stride = (offsets.numel() - 1) // len(self._keys)
            else:
                stride = 0
        self._stride = stride  # VBE without a given stride: derived on first use (see stride())
        self._stride_per_key = stride_per_key
        self._lengths_offset_per_key = lengths_offset_per_key
        self._length_per_key = length_per_key
        self._offset_per_key = offset_per_key
        self._index_per_key = index_per_key
        self._offsets_agree = False

    # --- construction -------------------------------------------------------------
    @staticmethod
    def from_lengths_sync(keys: List[str], values: torch.Tensor, lengths: torch.Tensor,
                          weights: Optional[torch.Tensor] = None, stride: Optional[int] = None,
                          stride_per_key_per_rank: Optional[List[List[int]]] = None,
                          inverse_indices: Optional[Tuple[List[str], torch.Tensor]] = None) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, weights, lengths=lengths, stride=stride,
                                 stride_per_key_per_rank=stride_per_key_per_rank,
                                 inverse_indices=inverse_indices).sync()

    @staticmethod
    def from_offsets_sync(keys: List[str], values: torch.Tensor, offsets: torch.Tensor,
                          weights: Optional[torch.Tensor] = None, stride: Optional[int] = None,
                          stride_per_key_per_rank: Optional[List[List[int]]] = None,
                          inverse_indices: Optional[Tuple[List[str], torch.Tensor]] = None) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor(keys, values, weights, offsets=offsets, stride=stride,
                                 stride_per_key_per_rank=stride_per_key_per_rank,
                                 inverse_indices=inverse_indices).sync()

    @staticmethod
    def from_jt_dict(jt_dict: Dict[str, JaggedTensor]) -> "KeyedJaggedTensor":
        """Stack per-feature JaggedTensors into a KJT, keys in dict order; features of different
        batch sizes make a VBE KJT (one rank), as in TorchRec."""
        return _ops.from_jt_dict(KeyedJaggedTensor, jt_dict)

    @staticmethod
    def empty(is_weighted: bool = False, device: Optional[torch.device] = None,
              values_dtype: Optional[torch.dtype] = None, weights_dtype: Optional[torch.dtype] = None,
              lengths_dtype: torch.dtype = torch.int32) -> "KeyedJaggedTensor":
        return KeyedJaggedTensor([], torch.empty(0, dtype=values_dtype, device=device),
                                 torch.empty(0, dtype=weights_dtype, device=device) if is_weighted else None,
                                 lengths=torch.empty(0, dtype=lengths_dtype, device=device), stride=0)

    @staticmethod
    def empty_like(kjt: "KeyedJaggedTensor", device: Optional[torch.device] = None) -> "KeyedJaggedTensor":
        """With no ``device``: no keys, in ``kjt``'s dtypes, keeping its stride (or VBE strides).
        With a ``device``: uninitialised tensors of ``kjt``'s shapes there, with its keys and
        host metadata (a buffer to copy a batch into)."""
        return _ops.empty_like(kjt, device)

    @staticmethod
    def concat(kjt_list: List["KeyedJaggedTensor"]) -> "KeyedJaggedTensor":
        """Join KJTs of one batch size (or all VBE) into one whose keys are all of theirs, in order."""
        return _ops.concat(kjt_list)

    # --- accessors ------------------------------------------------------------------
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

    def _no_bags_given(self) -> ValueError:
        return ValueError(f"this KeyedJaggedTensor (keys {self._keys}) was built with neither lengths nor offsets")

    def lengths(self) -> torch.Tensor:
        """``[K*B]`` ids per (key, sample); VBE ``[sum(B_k)]``."""
        if self._lengths is None:
            if self._offsets is None:
                raise self._no_bags_given()
            self._lengths = offsets_to_lengths(self._offsets)
            mark_dynamic_sizes((), (self._lengths,))
        return self._lengths

    def offsets(self) -> torch.Tensor:
        """``[K*B+1]`` start of each (key, sample) bag in ``values``."""
        if self._lengths is not None and torch.compiler.is_compiling():
            # Derived in the graph and not cached: the graph then reads only the lengths, whatever
            # an eager call cached, and leaves the KJT as it found it, so reusing it can't recompile.
            return lengths_to_offsets(self._lengths)
        if self._offsets is None:
            if self._lengths is None:
                raise self._no_bags_given()
            self._offsets = lengths_to_offsets(self._lengths)
            self._offsets_agree = True
            mark_dynamic_sizes((), (self._offsets,))  # cached: a compiled graph may see it as an input
        return self._offsets

    def lookup_offsets(self) -> torch.Tensor:
        """``[K*B+1]`` the offsets the embedding modules pool with: those of the lengths whenever
        the KJT has lengths. A compiled graph reads only the lengths (see :meth:`offsets`), so
        eager code must too, or a KJT given lengths and offsets that disagree would give two
        answers. Offsets given beside the lengths serve once validation has found that they
        agree (``validate=True``; see :meth:`mark_offsets_checked`)."""
        # compiling: no look at the cached offsets, which would guard the graph on their presence
        if self._lengths is not None and (torch.compiler.is_compiling() or self.has_unchecked_offsets()):
            return lengths_to_offsets(self._lengths)  # not cached: the caller's offsets stay as given
        return self.offsets()

    def has_unchecked_offsets(self) -> bool:
        """Whether the KJT holds both lengths and offsets that have not been found to agree:
        both given by the caller (or the lengths derived from given offsets), and not compared
        since. Validation compares them, then calls :meth:`mark_offsets_checked`. False when
        only one of them is held, or the offsets were derived here from the lengths."""
        return self._lengths is not None and self._offsets is not None and not self._offsets_agree

    def mark_offsets_checked(self) -> None:
        """Record that the held offsets agree with the held lengths (validation has compared
        them), so that :meth:`lookup_offsets` may use the offsets as they are."""
        self._offsets_agree = True

    def lengths_or_none(self) -> Optional[torch.Tensor]:
        return self._lengths

    def offsets_or_none(self) -> Optional[torch.Tensor]:
        return self._offsets

    def device(self) -> torch.device:
        return self._values.device

    def size_in_bytes(self) -> int:
        """Bytes of the tensors held (values, weights, lengths, offsets, VBE strides)."""
        return size_in_bytes(self._values, self._weights, self._lengths, self._offsets,
                             self._stride_per_key_per_rank)

    # --- views per key --------------------------------------------------------------
    def _jagged(self, k: int, compute_offsets: bool = True) -> JaggedTensor:
        start, end = self.offset_per_key()[k], self.offset_per_key()[k + 1]
        bag_start, bag_end = self.lengths_offset_per_key()[k], self.lengths_offset_per_key()[k + 1]
        all_lengths = self.lengths().reshape(-1)
        lengths = all_lengths[bag_start:bag_end]
        offsets = None
        if compute_offsets:
            # a KJT of no bags at all gives empty offsets, as TorchRec's does
            offsets = lengths if all_lengths.numel() == 0 else lengths_to_offsets(lengths)
        return JaggedTensor(self._values[start:end], None if self._weights is None else self._weights[start:end],
                            lengths=lengths, offsets=offsets)

    def __getitem__(self, key: str) -> JaggedTensor:
        if key not in self.index_per_key():
            raise KeyError(f"feature '{key}' is not in this KeyedJaggedTensor (keys: {self._keys})")
        return self._jagged(self.index_per_key()[key])

    def to_dict(self, compute_offsets: bool = True) -> Dict[str, JaggedTensor]:
        """One JaggedTensor per key (views); ``compute_offsets=False`` leaves their offsets unset."""
        return {key: self._jagged(k, compute_offsets) for k, key in enumerate(self._keys)}

    # --- key transforms (bodies in kjt_ops.py) -------------------------------------------
    def permute(self, indices: List[int], indices_tensor: Optional[torch.Tensor] = None) -> "KeyedJaggedTensor":
        """A KJT whose key ``i`` is this one's key ``indices[i]`` (keys may repeat or drop).
        Inverse indices are dropped, as TorchRec drops them."""
        del indices_tensor  # accepted for TorchRec compatibility; the host list is enough here
        return _ops.permute(self, indices)

    def split(self, segments: Sequence[int]) -> List["KeyedJaggedTensor"]:
        """Split into KJTs of ``segments[i]`` consecutive keys each. A segment of every key is
        this KJT itself, inverse indices and all; parts of fewer keys drop the inverse indices,
        as TorchRec's do."""
        return _ops.split(self, segments)

    def flatten_lengths(self) -> "KeyedJaggedTensor":
        """The same tensors with ``[K*B]`` (VBE ``[sum(B_k)]``) 1-D lengths and no offsets nor
        inverse indices (dropped, as TorchRec drops them). The batch size B is kept, as TorchRec
        keeps it once its ``stride()`` has been read."""
        return _ops.flatten_lengths(self)

    # --- input all-to-all (bodies in kjt_dist.py) --------------------------------------------
    def dist_labels(self) -> List[str]:
        """The names of :meth:`dist_tensors`: lengths, values, then strides (VBE), weights."""
        return _dist.dist_labels(self)

    def dist_splits(self, key_splits: List[int]) -> List[List[int]]:
        """For each tensor of :meth:`dist_tensors`, its sizes sent to each rank, when the first
        ``key_splits[0]`` keys go to rank 0, the next ``key_splits[1]`` to rank 1, and so on."""
        return _dist.dist_splits(self, key_splits)

    def dist_tensors(self) -> List[torch.Tensor]:
        """What the input all-to-all sends: ``[K*B]`` lengths, ``[N]`` values, for VBE ``[K]``
        int64 bags per key (on this KJT's device), and ``[N]`` weights when present."""
        return _dist.dist_tensors(self)

    @staticmethod
    def dist_init(keys: List[str], tensors: List[torch.Tensor], variable_stride_per_key: bool, num_workers: int,
                  recat: Optional[torch.Tensor], stride_per_rank: Optional[List[int]],
                  stagger: int = 1) -> "KeyedJaggedTensor":
        """The KJT of ``keys`` over every rank's batch, from the :meth:`dist_tensors` received
        from ``num_workers`` ranks (rank-major), reordered key-major by ``recat`` (None: already
        in order). ``stride_per_rank`` gives each rank's B (not VBE; when they differ, ``recat``
        orders single bags); VBE strides come with the tensors and ``stagger`` orders them as
        ``recat`` ordered the ranks. Synced, as TorchRec's is."""
        return _dist.dist_init(KeyedJaggedTensor, keys, tensors, variable_stride_per_key, num_workers, recat,
                               stride_per_rank, stagger)

    # --- movement -------------------------------------------------------------------
    def _map(self, fn, weights_fn=None) -> "KeyedJaggedTensor":
        """The same KJT with ``fn`` applied to each tensor (``weights_fn`` to the weights, if given)."""
        opt = lambda t, f=fn: None if t is None else f(t)  # noqa: E731
        inverse = self._inverse_indices
        kjt = KeyedJaggedTensor(
            self._keys, fn(self._values), opt(self._weights, weights_fn or fn), opt(self._lengths), opt(self._offsets),
            stride=self._stride, stride_per_key_per_rank=self._stride_per_key_per_rank,
            stride_per_key=self._stride_per_key, length_per_key=self._length_per_key,
            lengths_offset_per_key=self._lengths_offset_per_key, offset_per_key=self._offset_per_key,
            index_per_key=self._index_per_key, inverse_indices=None if inverse is None else (inverse[0], fn(inverse[1])))
        if self._offsets_agree:
            kjt.mark_offsets_checked()
        return kjt

    def to(self, device: torch.device, non_blocking: bool = False,
           dtype: Optional[torch.dtype] = None) -> "KeyedJaggedTensor":
        """A copy on ``device``; ``dtype`` converts the weights only, as in TorchRec."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return self._map(move, None if dtype is None else lambda t: move(t).to(dtype))

    def pin_memory(self) -> "KeyedJaggedTensor":
        return self._map(lambda t: t.pin_memory())

    def copy_(self, kjt: "KeyedJaggedTensor", non_blocking: bool = False) -> "KeyedJaggedTensor":
        """Copy ``kjt``'s tensors into this KJT's (same keys and shapes: a buffer from
        :meth:`empty_like`) and take its host metadata; returns this KJT."""
        _ops.copy_tensors(self, kjt, non_blocking)
        inverse = kjt.inverse_indices_or_none()
        if self._inverse_indices is not None:
            self._inverse_indices = (list(inverse[0]), self._inverse_indices[1])
        self._offsets_agree = not kjt.has_unchecked_offsets() or self._lengths is None or self._offsets is None
        # the host metadata is the source's, as TorchRec's copy_ takes it
        self._stride, self._stride_per_key_per_rank = kjt.stride_or_none(), kjt.stride_per_key_per_rank_tensor()
        self._stride_per_key = kjt.stride_per_key_or_none()
        self._lengths_offset_per_key = kjt.lengths_offset_per_key_or_none()
        self._length_per_key, self._offset_per_key = kjt.length_per_key_or_none(), kjt.offset_per_key_or_none()
        self._index_per_key = kjt.index_per_key_or_none()
        return self

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every device tensor held as in use by ``stream`` (host tensors: nothing to do)."""
        _ops.record_stream(self, stream)

    def clear_storage(self) -> int:
        """Free the tensors' memory now (their storage shrinks to 0 bytes) while this object lives
        on; returns the bytes freed. The KJT must not be read afterwards."""
        freed = 0
        for t in (self._values, self._lengths, self._offsets, self._weights):
            if t is not None:
                freed += t.element_size() * t.numel()
                t.untyped_storage().resize_(0)
        return freed

    def __str__(self) -> str:
        if not self._keys or (self._lengths is None and self._offsets is None):
            return "KeyedJaggedTensor()\n"
        offsets, bags = self.offsets().tolist(), self.lengths_offset_per_key()
        rows = [f'    "{key}": ' + _feature_string(self._values, self._weights, offsets, bags[k], bags[k + 1], "    ")
                for k, key in enumerate(self._keys)]
        return "KeyedJaggedTensor({\n" + ",\n".join(rows) + "\n})\n"
