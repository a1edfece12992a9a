"""TorchRec's sparse types at TorchRec's path (``torchrec.sparse.jagged_tensor``).

* ``JaggedTensor``: one feature's bags: ``[N]`` values, ``[B]`` lengths or ``[B+1]`` offsets,
  optional ``[N]`` weights.
* ``KeyedJaggedTensor``: K features' bags, key-major: ``[N]`` values, ``[K*B]`` lengths. For
  keys ``a, b`` and a batch of 3::

                  sample 0   sample 1   sample 2
      a           [1, 2]     []         [3]
      b           [4]        [5, 6]     []

      values  = [1, 2, 3, 4, 5, 6]      lengths = [2, 0, 1, 1, 2, 0]

* ``KeyedTensor``: dense per-key columns side by side, ``[B, sum(dims)]``.

The classes are written in the private modules beside this one; each is one object whatever
path it is imported from (``jaggedrec.KeyedJaggedTensor`` is this module's).

``as_keyed_jagged_tensor``, ``as_jagged_tensor`` and ``as_keyed_tensor`` take TorchRec's objects
(or jaggedrec's, returned as they are) and give jaggedrec's, sharing the tensors.
"""

from __future__ import annotations

from typing import List

import torch

from jaggedrec.sparse._convert import as_jagged_tensor, as_keyed_jagged_tensor, as_keyed_tensor
from jaggedrec.sparse._jagged import JaggedTensor, lengths_to_offsets, offsets_to_lengths
from jaggedrec.sparse._keyed_tensor import KeyedTensor
from jaggedrec.sparse._kjt import KeyedJaggedTensor
from jaggedrec.sparse._kjt_pytree import flatten_kjt_list, unflatten_kjt_list  # also registers KJT as a pytree node

# pickles and reprs name the public path, TorchRec's, not the file that holds the code
for _cls in (JaggedTensor, KeyedJaggedTensor, KeyedTensor):
    _cls.__module__ = __name__


def jt_is_equal(a: JaggedTensor, b: JaggedTensor) -> bool:
    """Whether two JaggedTensors hold the same bags: equal values, lengths and weights."""
    if (a.weights_or_none() is None) != (b.weights_or_none() is None):
        return False
    pairs = [(a.values(), b.values()), (a.lengths(), b.lengths())]
    if a.weights_or_none() is not None:
        pairs.append((a.weights(), b.weights()))
    return all(x.shape == y.shape and bool(torch.equal(x, y.to(x.dtype))) for x, y in pairs)


def kjt_is_equal(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> bool:
    """Whether two KeyedJaggedTensors have the same keys and, key by key, the same bags."""
    if a.keys() != b.keys() or a.stride() != b.stride():
        return False
    da, db = a.to_dict(), b.to_dict()
    return all(jt_is_equal(da[k], db[k]) for k in a.keys())


def regroup_kts(keyed_tensors: List[KeyedTensor], groups: List[List[str]]) -> List[torch.Tensor]:
    """Each group of keys gathered from ``keyed_tensors`` into one ``[B, sum(dims)]`` tensor
    (``KeyedTensor.regroup``)."""
    return KeyedTensor.regroup(keyed_tensors, groups)


__all__ = ["JaggedTensor", "KeyedJaggedTensor", "KeyedTensor", "as_jagged_tensor", "as_keyed_jagged_tensor",
           "as_keyed_tensor", "flatten_kjt_list", "jt_is_equal", "kjt_is_equal", "lengths_to_offsets", "offsets_to_lengths",
           "regroup_kts", "unflatten_kjt_list"]
