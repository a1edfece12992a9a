"""A ``KeyedJaggedTensor`` as a pytree node, so that torch.compile and torch.export take KJTs
as inputs and outputs and ``torch.load(weights_only=True)`` accepts them; and TorchRec's
``flatten_kjt_list`` / ``unflatten_kjt_list`` over that flattening.

Registered on import: ``jagged_tensor.py`` imports this module right after the class, so any
import of the sparse package registers it. (What torch.compile is told of a KJT's sizes as
it is built, ``mark_dynamic_sizes``, lives in ``_jagged.py``, beside the class's other helpers.)
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from jaggedrec.sparse._jagged import JAGGED_FIELDS, flatten_with_keys_fn
from jaggedrec.sparse._kjt import KeyedJaggedTensor


# --- pytree: lets torch.compile and torch.export take KJTs as inputs and outputs -------------
# Only tensors are leaves. The batch size is not context: it is re-derived from the
# lengths' shape, so that a new batch size is a new shape, not a new graph. A plain KJT's
# context is its key list, as before VBE (programs exported then still load); a VBE KJT's, or
# one with inverse indices, is (keys, stride_per_key_per_rank, inverse-index keys), and its
# inverse-index tensor is a fifth child.

def _kjt_flatten(kjt: KeyedJaggedTensor):
    children = [kjt.values(), kjt.weights_or_none(), kjt.lengths_or_none(), kjt.offsets_or_none()]
    inverse = kjt.inverse_indices_or_none()
    if inverse is None and not kjt.variable_stride_per_key():
        return children, list(kjt.keys())
    spkpr = kjt.stride_per_key_per_rank() if kjt.variable_stride_per_key() else None
    return children + [None if inverse is None else inverse[1]], (
        list(kjt.keys()), spkpr, None if inverse is None else list(inverse[0]))


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


# --- TorchRec's list helpers over the same flattening -----------------------------------------

def flatten_kjt_list(kjts: List[KeyedJaggedTensor]) -> Tuple[List[Optional[torch.Tensor]], List[Any]]:
    """The tensors of every KJT of ``kjts``, one list end to end, and one context per KJT, from
    which :func:`unflatten_kjt_list` rebuilds them. A KJT gives 4 tensors (values, weights,
    lengths, offsets; None where it has none), a VBE one or one with inverse indices a 5th."""
    tensors: List[Optional[torch.Tensor]] = []
    contexts: List[Any] = []
    for kjt in kjts:
        children, context = _kjt_flatten(kjt)
        tensors.extend(children)
        contexts.append(context)
    return tensors, contexts


def unflatten_kjt_list(tensors: List[Optional[torch.Tensor]], contexts: List[Any]) -> List[KeyedJaggedTensor]:
    """The KJTs that :func:`flatten_kjt_list` gave ``tensors`` and ``contexts`` for."""
    kjts, start = [], 0
    for context in contexts:
        count = 5 if isinstance(context, tuple) else 4  # a tuple: VBE or inverse indices
        if start + count > len(tensors):
            raise ValueError(f"unflatten_kjt_list: {len(tensors)} tensors are too few for {len(contexts)} "
                             f"KeyedJaggedTensors (KJT {len(kjts)} needs tensors {start}..{start + count - 1})")
        kjts.append(_kjt_unflatten(tensors[start:start + count], context))
        start += count
    if start != len(tensors):
        raise ValueError(f"unflatten_kjt_list: {len(tensors)} tensors for {len(contexts)} KeyedJaggedTensors, "
                         f"which take {start}")
    return kjts
