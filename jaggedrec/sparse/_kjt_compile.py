"""What torch.compile and torch.export are told of a ``KeyedJaggedTensor``: which of its sizes
change between batches (:func:`mark_dynamic_sizes`, called as the KJT is given or derives its
tensors), and how it flattens to tensors (a pytree node), so that compiled and exported
programs take KJTs as inputs and outputs; ``torch.load(weights_only=True)`` accepts them too.

Imported by ``keyed_jagged_tensor.py`` right after the class, for the registration's side effect.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch._dynamo.decorators import mark_unbacked, maybe_mark_dynamic

from jaggedrec.sparse._jagged import JAGGED_FIELDS, flatten_with_keys_fn
from jaggedrec.sparse._kjt import KeyedJaggedTensor


def mark_dynamic_sizes(ids: Sequence[Optional[torch.Tensor]], bags: Sequence[Optional[torch.Tensor]]) -> None:
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
