"""``KeyedTensor``: dense per-key blocks side by side, as an EmbeddingBagCollection returns them."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from jaggedrec.sparse._jagged import JaggedTensorMeta, size_in_bytes


def _cumsum(sizes: List[int]) -> List[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


@dataclasses.dataclass(init=False, repr=False, eq=False)
class KeyedTensor(metaclass=JaggedTensorMeta):
    """Dense blocks, one per key, concatenated along ``key_dim``.

    Args:
        keys: the K key names.
        length_per_key: width of each key's block along ``key_dim``.
        values: e.g. ``[B, sum(length_per_key)]`` for ``key_dim=1``.
        key_dim: the dimension the blocks are laid along.
    """

    _keys: List[str]
    _length_per_key: List[int]
    _values: torch.Tensor
    _key_dim: int
    _offset_per_key: Optional[List[int]] = None
    _index_per_key: Optional[Dict[str, int]] = None

    def __init__(self, keys: List[str], length_per_key: List[int], values: torch.Tensor, key_dim: int = 1,
                 offset_per_key: Optional[List[int]] = None,
                 index_per_key: Optional[Dict[str, int]] = None) -> None:
        if len(keys) != len(length_per_key):
            raise ValueError(f"KeyedTensor: {len(keys)} keys but {len(length_per_key)} lengths")
        self._keys = list(keys)
        self._length_per_key = list(length_per_key)
        self._values = values
        self._key_dim = key_dim
        self._offset_per_key = offset_per_key
        self._index_per_key = index_per_key

    @staticmethod
    def from_tensor_list(keys: List[str], tensors: List[torch.Tensor], key_dim: int = 1,
                         cat_dim: int = 1) -> "KeyedTensor":
        """One tensor per key, concatenated along ``cat_dim``."""
        return KeyedTensor(keys, [t.shape[key_dim] for t in tensors], torch.cat(tensors, dim=cat_dim), key_dim)

    @staticmethod
    def regroup(keyed_tensors: List["KeyedTensor"], groups: List[List[str]]) -> List[torch.Tensor]:
        """One tensor per group: the named keys' blocks, gathered from any of ``keyed_tensors``, in
        order. A key in several KeyedTensors is taken from the last of them, as TorchRec's
        method takes it (its ``regroup_kts`` takes the first)."""
        return _regroup(keyed_tensors, groups)

    @staticmethod
    def regroup_as_dict(keyed_tensors: List["KeyedTensor"], groups: List[List[str]],
                        keys: List[str]) -> Dict[str, torch.Tensor]:
        """:meth:`regroup`, each group's tensor named by ``keys``."""
        return _regroup_as_dict(keyed_tensors, groups, keys)

    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def key_dim(self) -> int:
        return self._key_dim

    def length_per_key(self) -> List[int]:
        return self._length_per_key

    def offset_per_key(self) -> List[int]:
        if self._offset_per_key is None:
            self._offset_per_key = _cumsum(self._length_per_key)
        return self._offset_per_key

    def device(self) -> torch.device:
        return self._values.device

    def size_in_bytes(self) -> int:
        return size_in_bytes(self._values)

    def _key_indices(self) -> Dict[str, int]:
        """Key -> position; TorchRec's regroup helpers read it under this name."""
        if self._index_per_key is None:
            self._index_per_key = {k: i for i, k in enumerate(self._keys)}
        return self._index_per_key

    def __getitem__(self, key: str) -> torch.Tensor:
        self._key_indices()
        if key not in self._index_per_key:
            raise KeyError(f"key '{key}' is not in this KeyedTensor (keys: {self._keys})")
        i = self._index_per_key[key]
        start = self.offset_per_key()[i]
        return self._values.narrow(self._key_dim, start, self._length_per_key[i])

    def to_dict(self) -> Dict[str, torch.Tensor]:
        blocks = torch.split(self._values, self._length_per_key, dim=self._key_dim)
        return dict(zip(self._keys, blocks))

    def to(self, device: torch.device, non_blocking: bool = False) -> "KeyedTensor":
        return KeyedTensor(self._keys, self._length_per_key, self._values.to(device, non_blocking=non_blocking),
                           self._key_dim, self._offset_per_key, self._index_per_key)

    def __str__(self) -> str:
        if not self._keys:
            return "KeyedTensor()\n"
        rows = [f'    "{key}": {self[key].tolist()}' for key in self._keys]
        return "KeyedTensor({\n" + ",\n".join(rows) + "\n})\n"


# --- regroup: plain functions that torch.fx records as one node each (``torch.fx.wrap``), since
# they iterate their arguments, which a traced graph cannot ---------------------------------

@torch.fx.wrap
def _regroup(keyed_tensors: List[KeyedTensor], groups: List[List[str]], first_holder: bool = False,
             caller: str = "regroup") -> List[torch.Tensor]:
    """A key held by several KeyedTensors is taken from the first of them with ``first_holder``,
    else from the last. An empty group gives a block of width 0 (of the first KeyedTensor's
    other sizes)."""
    where: Dict[str, KeyedTensor] = {}
    for kt in reversed(keyed_tensors) if first_holder else keyed_tensors:
        for key in kt.keys():
            where[key] = kt
    out = []
    for group in groups:
        missing = [key for key in group if key not in where]
        if missing:
            raise KeyError(f"{caller}: keys {missing} are in none of the KeyedTensors")
        if not group:
            if not keyed_tensors:
                raise ValueError(f"{caller}: an empty group needs a KeyedTensor to take its batch size from")
            first = keyed_tensors[0]
            out.append(first.values().narrow(first.key_dim(), 0, 0))
            continue
        dims = {where[key].key_dim() for key in group}
        if len(dims) != 1:
            raise ValueError(f"{caller}: group {group} mixes key_dims {sorted(dims)}")
        out.append(torch.cat([where[key][key] for key in group], dim=dims.pop()))
    return out


def regroup_kts(keyed_tensors: List[KeyedTensor], groups: List[List[str]]) -> List[torch.Tensor]:
    """One tensor per group of keys, the keys' blocks side by side in the group's order.

    Args:
        keyed_tensors: e.g. the pooled outputs of several EmbeddingBagCollections, each
            ``[B, sum(dims)]``.
        groups: key names; a key may appear in several groups.

    Returns:
        ``[B, sum of the group's dims]`` per group (width 0 for an empty group). Unlike
        :meth:`KeyedTensor.regroup`, a key that several KeyedTensors hold is taken from the
        first of them, as TorchRec's ``regroup_kts`` takes it.
    """
    return _regroup(keyed_tensors, groups, True, "regroup_kts")


def permute_multi_embedding(keyed_tensors: List[KeyedTensor], groups: List[List[str]]) -> List[torch.Tensor]:
    """TorchRec's other name for :func:`regroup_kts` (the same result)."""
    return _regroup(keyed_tensors, groups, True, "permute_multi_embedding")


@torch.fx.wrap
def _regroup_as_dict(keyed_tensors: List[KeyedTensor], groups: List[List[str]],
                     keys: List[str]) -> Dict[str, torch.Tensor]:
    if len(groups) != len(keys):
        raise ValueError(f"regroup_as_dict: {len(groups)} groups but {len(keys)} names")
    return dict(zip(keys, _regroup(keyed_tensors, groups)))


# --- pytree -------------------------------------------------------------------------------------

def _kt_flatten(kt: KeyedTensor):
    return [kt.values()], (list(kt.keys()), list(kt.length_per_key()), kt.key_dim())


def _kt_flatten_with_keys(kt: KeyedTensor):
    children, context = _kt_flatten(kt)
    return [(pytree.GetAttrKey("_values"), children[0])], context


def _kt_unflatten(children, context) -> KeyedTensor:
    keys, length_per_key, key_dim = context
    return KeyedTensor(keys, length_per_key, children[0], key_dim)


def _kt_flatten_spec(kt: KeyedTensor, spec: pytree.TreeSpec) -> List[torch.Tensor]:
    """``kt``'s values laid out in the key order of ``spec`` (torch.export's output spec): an
    exported program's caller may hand back a KeyedTensor whose keys come in another order."""
    keys, _length_per_key, key_dim = spec.context
    if list(kt.keys()) == list(keys):
        return [kt.values()]
    return [torch.cat([kt[key] for key in keys], dim=key_dim)]


pytree.register_pytree_node(KeyedTensor, _kt_flatten, _kt_unflatten,
                            serialized_type_name="jaggedrec.KeyedTensor",
                            flatten_with_keys_fn=_kt_flatten_with_keys)
fx_pytree.register_pytree_flatten_spec(KeyedTensor, _kt_flatten_spec)
# so that torch.load(weights_only=True), which torch.export.load uses, accepts them
torch.serialization.add_safe_globals([KeyedTensor])
