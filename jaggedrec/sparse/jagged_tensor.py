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

Beside the classes, TorchRec's module-level API: ``jt_is_equal`` and ``kjt_is_equal`` (test
helpers), ``regroup_kts`` and ``permute_multi_embedding`` (pooled outputs regrouped),
``ComputeKJTToJTDict`` and ``ComputeJTDictToKJT`` (the conversions as modules, which fx
tracing can keep as leaves), ``flatten_kjt_list`` and ``unflatten_kjt_list``, and the metaclass
``JaggedTensorMeta``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from jaggedrec.sparse._convert import as_jagged_tensor, as_keyed_jagged_tensor, as_keyed_tensor
from jaggedrec.sparse._jagged import JaggedTensor, JaggedTensorMeta, lengths_to_offsets, offsets_to_lengths
from jaggedrec.sparse._keyed_tensor import KeyedTensor, permute_multi_embedding, regroup_kts
from jaggedrec.sparse._kjt import KeyedJaggedTensor
from jaggedrec.sparse._kjt_pytree import flatten_kjt_list, unflatten_kjt_list  # also registers KJT as a pytree node
from jaggedrec.sparse._segments import repeat_counts, traced

# pickles and reprs name the public path, TorchRec's, not the file that holds the code
for _cls in (JaggedTensor, KeyedJaggedTensor, KeyedTensor):
    _cls.__module__ = __name__


# --- equality, as TorchRec's test helpers define it --------------------------------------------

def _close(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Both None, or tensors of one shape and dtype whose elements are ``torch.allclose`` (the
    tolerance TorchRec compares with; its helpers raise where the dtypes differ)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.allclose(a, b))


def _converted(convert: Callable[[Any], Any], obj: Any) -> Any:
    try:
        return convert(obj)
    except TypeError:
        return None


@torch.fx.wrap
def jt_is_equal(jt_1: JaggedTensor, jt_2: JaggedTensor) -> bool:
    """Whether two JaggedTensors hold the same values, weights, lengths and offsets.

    Tensors are compared with ``torch.allclose`` and must agree in shape and dtype; a JT
    given only lengths (or only offsets) has the other derived first (and cached), so that
    the same bags given either way are equal. Something that is not a JaggedTensor (jaggedrec's
    or TorchRec's) is equal to nothing.
    """
    a, b = _converted(as_jagged_tensor, jt_1), _converted(as_jagged_tensor, jt_2)
    if a is None or b is None or not _close(a.values(), b.values()):
        return False
    return (_close(a.weights_or_none(), b.weights_or_none()) and _close(a.lengths(), b.lengths())
            and _close(a.offsets(), b.offsets()))


def _both_bag_forms(kjt: KeyedJaggedTensor) -> None:
    """Derive (and cache) lengths from offsets or offsets from lengths, whichever is missing."""
    if kjt.lengths_or_none() is None and kjt.offsets_or_none() is not None:
        kjt.lengths()
    elif kjt.offsets_or_none() is None and kjt.lengths_or_none() is not None:
        kjt.offsets()


@torch.fx.wrap
def kjt_is_equal(kjt_1: KeyedJaggedTensor, kjt_2: KeyedJaggedTensor) -> bool:
    """Whether two KeyedJaggedTensors have the same keys in the same order, and the same values,
    weights, lengths, offsets, ids per key (``length_per_key``, ``offset_per_key``) and batch size.

    As TorchRec's helper: tensors are compared with ``torch.allclose`` (shape and dtype must
    agree), the missing one of lengths and offsets is derived and the ids per key are synced
    first (all cached on the KJTs), and VBE strides and inverse indices are not compared.
    Something that is not a KeyedJaggedTensor (jaggedrec's or TorchRec's) is equal to nothing.
    """
    a, b = _converted(as_keyed_jagged_tensor, kjt_1), _converted(as_keyed_jagged_tensor, kjt_2)
    if a is None or b is None or list(a.keys()) != list(b.keys()) or not _close(a.values(), b.values()):
        return False
    for kjt in (a, b):
        _both_bag_forms(kjt)
        kjt.sync()
    return (_close(a.lengths_or_none(), b.lengths_or_none()) and _close(a.weights_or_none(), b.weights_or_none())
            and _close(a.offsets_or_none(), b.offsets_or_none())
            and a.length_per_key_or_none() == b.length_per_key_or_none()
            and a.offset_per_key_or_none() == b.offset_per_key_or_none() and a.stride() == b.stride())


# --- the KJT <-> JaggedTensor dict conversions as modules ----------------------------------------

class ComputeKJTToJTDict(torch.nn.Module):
    """``forward(kjt)``: one JaggedTensor per key, ``{key: kjt[key]}`` in key order (views of the
    KJT's tensors, with offsets), as ``KeyedJaggedTensor.to_dict()`` gives them. TorchRec's KJT
    is taken too."""

    def forward(self, keyed_jagged_tensor: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        return as_keyed_jagged_tensor(keyed_jagged_tensor).to_dict()


class ComputeJTDictToKJT(torch.nn.Module):
    """``forward(jt_dict)``: the KeyedJaggedTensor of the dict's features, keys in dict order, as
    ``KeyedJaggedTensor.from_jt_dict`` builds it (features of different batch sizes make a VBE KJT)."""

    def forward(self, jt_dict: Dict[str, JaggedTensor]) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_jt_dict(jt_dict)


__all__ = ["ComputeJTDictToKJT", "ComputeKJTToJTDict", "JaggedTensor", "JaggedTensorMeta", "KeyedJaggedTensor",
           "KeyedTensor", "as_jagged_tensor", "as_keyed_jagged_tensor", "as_keyed_tensor", "flatten_kjt_list",
           "jt_is_equal", "kjt_is_equal", "lengths_to_offsets", "offsets_to_lengths", "permute_multi_embedding",
           "regroup_kts", "repeat_counts", "traced", "unflatten_kjt_list"]
