"""How a ``KeyedJaggedTensor`` flattens to tensors (a pytree node), so that torch.compile and
torch.export take KJTs as inputs and outputs, and ``torch.load(weights_only=True)`` accepts them.

Imported by ``keyed_jagged_tensor.py`` right after the class, for the registration's side effect.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from .jagged_tensor import JAGGED_FIELDS, flatten_with_keys_fn
from .keyed_jagged_tensor import KeyedJaggedTensor


# --- pytree: lets torch.compile and torch.export take KJTs as inputs and outputs -------------
# Only tensors are leaves. The batch size is not context: it is re-derived from the
# lengths' shape, so that a new batch size is a new shape, not a new graph. A plain KJT's
# context is its key list, as before VBE (programs exported then still load); a VBE KJT's, or
# one with inverse indices, is (keys, stride_per_key_per_rank, inverse-index keys), and its
# inverse-index tensor is a fifth child.

def _kjt_flatten(kjt: KeyedJaggedTensor):
    children = [kjt._values, kjt._weights, kjt._lengths, kjt._offsets]
    inverse = kjt._inverse_indices
    if inverse is None and not kjt.variable_stride_per_key():
        return children, list(kjt._keys)
    spkpr = kjt.stride_per_key_per_rank() if kjt.variable_stride_per_key() else None
    return children + [None if inverse is None else inverse[1]], (
        list(kjt._keys), spkpr, None if inverse is None else list(inverse[0]))


def _kjt_unflatten(children, context) -> KeyedJaggedTensor:
    if len(children) not in (4, 5):
        raise ValueError(f"a KeyedJaggedTensor flattens to 4 or 5 tensors, got {len(children)}")
    values, weights, lengths, offsets = children[:4]
    if isinstance(context, tuple):
        keys, spkpr, inverse_keys = context
    else:
        keys, spkpr, inverse_keys = context, None, None
    inverse = None
    if len(children) == 5 and children[4] is not None:
        inverse = (list(inverse_keys if inverse_keys is not None else keys), children[4])
    return KeyedJaggedTensor(keys, values, weights, lengths=lengths, offsets=offsets,
                             stride_per_key_per_rank=spkpr, inverse_indices=inverse)


def _kjt_flatten_spec(kjt: KeyedJaggedTensor, spec: pytree.TreeSpec) -> List[Optional[torch.Tensor]]:
    return _kjt_flatten(kjt)[0]


_KJT_FIELDS = JAGGED_FIELDS + ("_inverse_indices",)
pytree.register_pytree_node(KeyedJaggedTensor, _kjt_flatten, _kjt_unflatten,
                            serialized_type_name="jaggedrec.KeyedJaggedTensor",
                            flatten_with_keys_fn=flatten_with_keys_fn(_kjt_flatten, _KJT_FIELDS))
fx_pytree.register_pytree_flatten_spec(KeyedJaggedTensor, _kjt_flatten_spec)
torch.serialization.add_safe_globals([KeyedJaggedTensor])
