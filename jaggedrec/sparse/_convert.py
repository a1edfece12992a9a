"""jaggedrec's sparse types from whatever a migrating program hands over.

Code written for TorchRec builds ``torchrec.KeyedJaggedTensor`` batches (in its data loaders,
its input transforms, its tests) and feeds them to modules that are now jaggedrec's; it
pools with TorchRec's ``KeyedTensor`` beside jaggedrec's. The functions here take such an
object and return jaggedrec's type holding the very same tensors (no copy: the result's
values, lengths, offsets, weights and inverse indices are the other object's tensors), with
the host metadata the other object already knows (its batch size, its VBE strides, its ids
per key when computed), so that nothing is read back from the device.

Only the other object's public methods are used, and TorchRec is never imported: an object
is taken as TorchRec's type when its class (or a base) has that type's name and it has the
methods read. A jaggedrec object comes back as it is, the same object; so does a
``torch.fx.Proxy`` (a module's input while ``torch.fx.symbolic_trace`` records it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from jaggedrec.sparse._jagged import JaggedTensor
from jaggedrec.sparse._keyed_tensor import KeyedTensor
from jaggedrec.sparse._kjt import KeyedJaggedTensor

# what is read of the other object, per type
_KJT_METHODS = ("keys", "values", "weights_or_none", "lengths_or_none", "offsets_or_none", "stride",
                "variable_stride_per_key", "stride_per_key_per_rank", "inverse_indices_or_none",
                "length_per_key_or_none", "offset_per_key_or_none")
_JT_METHODS = ("values", "weights_or_none", "lengths_or_none", "offsets_or_none")
_KT_METHODS = ("keys", "length_per_key", "values", "key_dim")


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _check_shaped_like(obj: Any, class_name: str, methods: Sequence[str], caller: str) -> None:
    """TypeError unless ``obj``'s class (or a base) is named ``class_name`` and ``obj`` has
    every one of ``methods``."""
    named = any(cls.__name__ == class_name for cls in type(obj).__mro__)
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if named and not missing:
        return
    accepted = (f"a {class_name}: jaggedrec's, or TorchRec's (or another class of that name with the public "
                f"methods {', '.join(f'{m}()' for m in methods)})")
    if named:
        raise TypeError(f"{caller}: got a {_type_name(obj)} without the methods {missing}; expected {accepted}")
    raise TypeError(f"{caller}: got a {_type_name(obj)}; expected {accepted}")


def as_keyed_jagged_tensor(obj: Any) -> KeyedJaggedTensor:
    """``obj`` as jaggedrec's ``KeyedJaggedTensor``, sharing its tensors.

    Args:
        obj: a jaggedrec ``KeyedJaggedTensor`` (returned as it is), or TorchRec's (or one with
            its public API): keys, ``[N]`` values, optional ``[N]`` weights, ``[K*B]`` lengths
            and/or ``[K*B+1]`` offsets (VBE: ``[sum(B_k)]`` lengths), with the VBE strides
            ``[K][R]`` and the ``(keys, [K', B])`` inverse indices when it has them.

    Returns:
        A KJT whose values, weights, lengths, offsets and inverse-index tensors are ``obj``'s
        own, with its batch size, VBE strides and, when ``obj`` has computed them, its ids per
        key. Lengths and offsets given together are compared by validation, as if the
        caller had given both to jaggedrec's constructor.

    Raises:
        TypeError: ``obj`` is not a KeyedJaggedTensor.
    """
    if isinstance(obj, (KeyedJaggedTensor, torch.fx.Proxy)):
        return obj
    _check_shaped_like(obj, "KeyedJaggedTensor", _KJT_METHODS, "as_keyed_jagged_tensor")
    vbe = obj.variable_stride_per_key()
    return KeyedJaggedTensor(
        list(obj.keys()), obj.values(), obj.weights_or_none(), lengths=obj.lengths_or_none(),
        offsets=obj.offsets_or_none(), stride=obj.stride(),
        # [K][R] host ints, read from obj's host tensor of them: no device read
        stride_per_key_per_rank=obj.stride_per_key_per_rank() if vbe else None,
        length_per_key=obj.length_per_key_or_none(), offset_per_key=obj.offset_per_key_or_none(),
        inverse_indices=obj.inverse_indices_or_none())


def as_jagged_tensor(obj: Any) -> JaggedTensor:
    """``obj`` as jaggedrec's ``JaggedTensor``, sharing its tensors.

    Args:
        obj: a jaggedrec ``JaggedTensor`` (returned as it is), or TorchRec's (or one with its
            public API): ``[N]`` values, optional ``[N]`` weights, ``[B]`` lengths and/or
            ``[B+1]`` offsets.

    Raises:
        TypeError: ``obj`` is not a JaggedTensor.
    """
    if isinstance(obj, (JaggedTensor, torch.fx.Proxy)):
        return obj
    _check_shaped_like(obj, "JaggedTensor", _JT_METHODS, "as_jagged_tensor")
    return JaggedTensor(obj.values(), obj.weights_or_none(), lengths=obj.lengths_or_none(),
                        offsets=obj.offsets_or_none())


def as_keyed_tensor(obj: Any) -> KeyedTensor:
    """``obj`` as jaggedrec's ``KeyedTensor``, sharing its values tensor.

    Args:
        obj: a jaggedrec ``KeyedTensor`` (returned as it is), or TorchRec's (or one with its
            public API): keys, each key's width along ``key_dim``, and the values (e.g.
            ``[B, sum(length_per_key)]`` for ``key_dim=1``).

    Raises:
        TypeError: ``obj`` is not a KeyedTensor.
    """
    if isinstance(obj, (KeyedTensor, torch.fx.Proxy)):
        return obj
    _check_shaped_like(obj, "KeyedTensor", _KT_METHODS, "as_keyed_tensor")
    return KeyedTensor(list(obj.keys()), list(obj.length_per_key()), obj.values(), key_dim=obj.key_dim())
