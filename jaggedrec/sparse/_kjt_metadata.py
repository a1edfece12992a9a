"""The host metadata of a ``KeyedJaggedTensor``: how many bags each key has (one batch size B,
or each key's own ``B_k`` under variable batch per feature, VBE) and how many ids, where each
key's bags and ids start, and the VBE inverse indices.

Each list is derived from the tensors on first use and cached (or given to the constructor),
so that nothing is read back to the host until something asks.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

_KJT = TypeVar("_KJT", bound="KJTMetadata")


class KJTMetadata:
    """Mixed into ``KeyedJaggedTensor``, whose fields (``_keys``, ``_lengths``,
    ``_stride_per_key_per_rank``, the cached lists ...) these methods read and fill.

    Each derived list has an ``..._or_none()`` twin that returns it only if it is already
    known (given to the constructor or derived before) and never computes it: what a KJT
    built from this one can take along without reading anything back.
    """

    # --- batch size -------------------------------------------------------------------
    def stride(self) -> int:
        """B. While compiling it is read off the lengths' (or offsets') size, so that it is the
        tensors' own symbol rather than a second, separately guarded int. VBE: the width of the
        inverse indices when given, else the largest ``B_k``."""
        if self._keys and torch.compiler.is_compiling():
            if self._stride_per_key_per_rank is None:
                bags = self._lengths.shape[0] if self._lengths is not None else self._offsets.shape[0] - 1
                return bags // len(self._keys)
            if self._inverse_indices is not None:
                # VBE: the inverse indices' width, never the cache, which an eager call may
                # have filled and a graph would then guard on
                return self._inverse_indices[1].shape[-1]
        if self._stride is None:  # VBE
            if self._inverse_indices is not None and self._inverse_indices[1].numel() > 0:
                self._stride = self._inverse_indices[1].shape[-1]
            else:
                per_key = self.stride_per_key()
                self._stride = max(per_key) if per_key else 0
        return self._stride

    def variable_stride_per_key(self) -> bool:
        """Whether keys have their own batch sizes (``stride_per_key_per_rank`` was given)."""
        return self._stride_per_key_per_rank is not None

    def stride_per_key(self) -> List[int]:
        """``[K]`` bags of each key: B for every key, or VBE's ``B_k``."""
        if self._stride_per_key is None:
            spkpr = self._stride_per_key_per_rank
            if spkpr is None:
                self._stride_per_key = [self.stride()] * len(self._keys)
            else:  # a tensor not of [K, R] (TorchRec's validator reports it) has no strides
                self._stride_per_key = spkpr.sum(1).tolist() if spkpr.dim() == 2 else []
        return self._stride_per_key

    def stride_per_key_per_rank(self) -> List[List[int]]:
        """``[K][R]`` as given for a VBE KJT; ``[]`` otherwise."""
        spkpr = self._stride_per_key_per_rank
        return [] if spkpr is None else spkpr.tolist()

    def stride_per_key_per_rank_tensor(self) -> Optional[torch.Tensor]:
        """The VBE strides as held: a ``[K, R]`` int tensor on the host, as given (a list given
        is held as an int32 tensor), not checked against the keys; None when not VBE."""
        return self._stride_per_key_per_rank

    def stride_or_none(self) -> Optional[int]:
        """B when known: always for a KJT that is not VBE; for a VBE KJT once given or derived."""
        return self._stride

    def stride_per_key_or_none(self) -> Optional[List[int]]:
        return self._stride_per_key

    def lengths_offset_per_key(self) -> List[int]:
        """``[K+1]`` start of each key's bags in ``lengths``."""
        if torch.compiler.is_compiling():
            return _cumsum(self.stride_per_key())
        if self._lengths_offset_per_key is None:
            self._lengths_offset_per_key = _cumsum(self.stride_per_key())
        return self._lengths_offset_per_key

    def lengths_offset_per_key_or_none(self) -> Optional[List[int]]:
        return self._lengths_offset_per_key

    def inverse_indices(self) -> Tuple[List[str], torch.Tensor]:
        if self._inverse_indices is None:
            raise ValueError(f"this KeyedJaggedTensor (keys {self._keys}) has no inverse_indices")
        return self._inverse_indices

    def inverse_indices_or_none(self) -> Optional[Tuple[List[str], torch.Tensor]]:
        return self._inverse_indices

    # --- ids per key (host) -------------------------------------------------------------
    def sync(self: _KJT) -> _KJT:
        """Read the per-key sizes to the host now, so later splits don't wait."""
        if not torch.compiler.is_compiling():
            self.offset_per_key()
        return self

    def unsync(self: _KJT) -> _KJT:
        """Forget the per-key sizes read by :meth:`sync`."""
        self._length_per_key = None
        self._offset_per_key = None
        return self

    def length_per_key(self) -> List[int]:
        """Number of ids of each key (read from the device once, then cached)."""
        if self._length_per_key is None:
            self._length_per_key = self._count_per_key()
        return self._length_per_key

    def _count_per_key(self) -> List[int]:
        num_keys = len(self._keys)
        if not num_keys:
            return []
        if self._values.is_meta:
            # nothing to read: a split that adds up, so that meta KJTs still split and view
            # (TorchRec does the same)
            total = self._values.shape[0]
            counts = [total // num_keys] * num_keys
            counts[0] += total % num_keys
            return counts
        lengths = self.lengths()
        if lengths.numel() == 0:
            return [0] * num_keys
        if self._stride_per_key_per_rank is None:
            return lengths.reshape(num_keys, self.stride()).sum(1).tolist()
        # VBE: ids before each key's first bag, from one cumsum (no per-key calls)
        bounds = torch.tensor(self.lengths_offset_per_key(), device=lengths.device)
        before = torch.nn.functional.pad(lengths.reshape(-1).cumsum(0), (1, 0)).index_select(0, bounds)
        return (before[1:] - before[:-1]).tolist()

    def length_per_key_or_none(self) -> Optional[List[int]]:
        return self._length_per_key

    def offset_per_key(self) -> List[int]:
        """``[K+1]`` start of each key's ids in ``values``."""
        if self._offset_per_key is None:
            self._offset_per_key = _cumsum(self.length_per_key())
        return self._offset_per_key

    def offset_per_key_or_none(self) -> Optional[List[int]]:
        return self._offset_per_key

    def index_per_key(self) -> Dict[str, int]:
        if self._index_per_key is None:
            self._index_per_key = {key: i for i, key in enumerate(self._keys)}
        return self._index_per_key

    def index_per_key_or_none(self) -> Optional[Dict[str, int]]:
        return self._index_per_key

    _key_indices = index_per_key  # TorchRec's private name, which its helpers call


def _cumsum(sizes: Sequence[int]) -> List[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out
