"""``JaggedTensor``: one jagged feature over a batch, with TorchRec's API, and the helpers
that ``KeyedJaggedTensor`` (in ``_kjt.py``) shares: the metaclass, integer checks, lengths
and offsets, printing, and what torch.compile is told of the sizes.

The tensors are the only required state; lengths and offsets are derived from each other
on first use and cached.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.fx._symbolic_trace as fx_trace
import torch.utils._pytree as pytree
from jaggedrec.sparse._segments import repeat_counts
from torch._dynamo.decorators import mark_unbacked, maybe_mark_dynamic

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class JaggedTensorMeta(fx_trace.ProxyableClassMeta):
    """Metaclass of the sparse types: under ``torch.fx.symbolic_trace`` a constructor call on
    traced values becomes one node of the graph instead of running ``__init__`` (whose checks
    would branch on traced values), as TorchRec's types do."""

    def __call__(cls, *args, **kwargs):
        # Outside fx symbolic tracing, plain construction. Asked without torch's older check
        # (is_fx_tracing), which logs a warning on first use that every KJT would then trigger,
        # and is also true under torch.export, where arguments are never fx proxies.
        if not fx_trace.is_fx_symbolic_tracing():
            return type.__call__(cls, *args, **kwargs)
        return super().__call__(*args, **kwargs)


class IntegerDtypeError(TypeError, AssertionError):
    """Lengths or offsets that are not integers. A ``TypeError``, and also an
    ``AssertionError``, which is what TorchRec's constructors raise for it, so that code
    written against either catches it."""


def _check_integer(tensor: Optional[torch.Tensor], name: str, owner: str) -> None:
    # an empty tensor of any dtype is accepted: ``torch.tensor([])`` (float) is how TorchRec's
    # users write "no bags", and there is nothing in it to misread
    if tensor is not None and tensor.dtype not in _INT_DTYPES and tensor.numel() > 0:
        raise IntegerDtypeError(f"{owner}: {name} must be an integer tensor, got {tensor.dtype}")


def offsets_dtype(lengths_dtype: torch.dtype) -> torch.dtype:
    """The dtype of offsets derived from lengths of ``lengths_dtype``: int32 for int32 lengths
    (valid lengths are non-negative and add up to the id count, so their partial sums fit),
    int64 otherwise: summed in their own dtype, uint8 lengths [200, 200] would give offsets
    [0, 200, 144]. Validation checks the lengths themselves, not offsets derived from them."""
    return torch.int32 if lengths_dtype == torch.int32 else torch.int64


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[n]`` lengths -> ``[n+1]`` offsets starting at 0, int32 or int64 (:func:`offsets_dtype`)."""
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=offsets_dtype(lengths.dtype)), (1, 0))


def offsets_to_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """``[n+1]`` offsets -> ``[n]`` lengths."""
    return offsets[1:] - offsets[:-1]


def _values_string(values: torch.Tensor, start: int, end: int) -> str:
    """``[v, v]`` for 1-D values, ``[[v, v], [v, v]]`` for ``[N, D]`` ones."""
    if values.dim() > 2:
        raise ValueError(f"cannot print {values.dim()}-D values of shape {tuple(values.shape)}: "
                         "only [N] and [N, D] values print")
    return "[" + ", ".join(str(v) for v in values[start:end].tolist()) + "]"


def _bags_string(values: torch.Tensor, offsets: List[int], first: int, last: int) -> str:
    """``[[v, v], [], [v]]`` for bags ``first..last-1``."""
    return "[" + ", ".join(_values_string(values, offsets[i], offsets[i + 1]) for i in range(first, last)) + "]"


def _feature_string(values: torch.Tensor, weights: Optional[torch.Tensor], offsets: List[int],
                    first: int, last: int, indent: str) -> str:
    if weights is None:
        return _bags_string(values, offsets, first, last)
    return (f'{{\n{indent}    "values": {_bags_string(values, offsets, first, last)},\n'
            f'{indent}    "weights": {_bags_string(weights, offsets, first, last)}\n{indent}}}')


@torch.fx.wrap
def _optional_mask(tensor: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[torch.Tensor]:
    """``tensor[mask]``, or None. One fx node: a traced ``is not None`` would be decided at
    trace time, for every later call."""
    return None if tensor is None else tensor[mask]


def size_in_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes held by the given tensors' elements (None counts 0)."""
    return sum(t.element_size() * t.numel() for t in tensors if t is not None)


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


@dataclasses.dataclass(init=False, repr=False, eq=False)
class JaggedTensor(metaclass=JaggedTensorMeta):
    """One feature for a batch: bag ``b`` holds ``values[offsets[b]:offsets[b+1]]``.

    Args:
        values: ``[N]`` ids (or any values; ``[N, D]`` rows also work).
        weights: optional ``[N]`` per-value weights.
        lengths: ``[B]`` ids per bag. Derived from ``offsets`` when missing.
        offsets: ``[B+1]`` bag starts, ``offsets[0] == 0``. Derived from ``lengths`` when missing.
    """

    _values: torch.Tensor
    _weights: Optional[torch.Tensor]
    _lengths: Optional[torch.Tensor]
    _offsets: Optional[torch.Tensor]

    def __init__(self, values: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 lengths: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None) -> None:
        if lengths is None and offsets is None:
            raise ValueError("JaggedTensor needs lengths or offsets")
        _check_integer(lengths, "lengths", "JaggedTensor")
        _check_integer(offsets, "offsets", "JaggedTensor")
        self._values, self._weights, self._lengths, self._offsets = values, weights, lengths, offsets

    @staticmethod
    def empty(is_weighted: bool = False, device: Optional[torch.device] = None,
              values_dtype: Optional[torch.dtype] = None, weights_dtype: Optional[torch.dtype] = None,
              lengths_dtype: torch.dtype = torch.int32) -> "JaggedTensor":
        """No bags. Lengths and offsets are both empty, as TorchRec makes them."""
        empty_lengths = torch.empty(0, dtype=lengths_dtype, device=device)
        return JaggedTensor(torch.empty(0, dtype=values_dtype, device=device),
                            weights=torch.empty(0, dtype=weights_dtype, device=device) if is_weighted else None,
                            lengths=empty_lengths, offsets=empty_lengths)

    @staticmethod
    def empty_like(jt: "JaggedTensor", device: Optional[torch.device] = None) -> "JaggedTensor":
        """With no ``device``: no bags, in ``jt``'s dtypes and device. With a ``device``:
        uninitialised tensors of ``jt``'s shapes and dtypes there (a buffer to copy into)."""
        if device is None:
            like = lambda t: None if t is None else t.new_empty(0)  # noqa: E731
            return JaggedTensor(like(jt.values()), like(jt.weights_or_none()), lengths=jt.lengths().new_empty(0))
        like = lambda t: None if t is None else torch.empty_like(t, device=device)  # noqa: E731
        return JaggedTensor(like(jt.values()), like(jt.weights_or_none()), like(jt.lengths_or_none()),
                            like(jt.offsets_or_none()))

    @staticmethod
    def from_dense(values: List[torch.Tensor], weights: Optional[List[torch.Tensor]] = None) -> "JaggedTensor":
        """One tensor per bag -> JaggedTensor. ``values[b]`` is ``[L_b]``; lengths are int32,
        as TorchRec's."""
        lengths = torch.tensor([v.size(0) for v in values], dtype=torch.int32,
                               device=values[0].device if values else None)
        return JaggedTensor(torch.cat(values) if values else torch.empty(0, dtype=torch.long),
                            weights=torch.cat(weights) if weights is not None else None, lengths=lengths)

    @staticmethod
    def from_dense_lengths(values: torch.Tensor, lengths: torch.Tensor,
                           weights: Optional[torch.Tensor] = None) -> "JaggedTensor":
        """``[B, L]`` padded values and ``[B]`` lengths -> JaggedTensor of the first ``lengths[b]`` of each row."""
        mask = torch.arange(values.size(1), device=values.device) < lengths.unsqueeze(-1)
        return JaggedTensor(values[mask], weights=_optional_mask(weights, mask), lengths=lengths)

    def values(self) -> torch.Tensor:
        return self._values

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("this JaggedTensor has no weights")
        return self._weights

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = offsets_to_lengths(self._offsets)
        return self._lengths

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = lengths_to_offsets(self._lengths)
        return self._offsets

    def lengths_or_none(self) -> Optional[torch.Tensor]:
        return self._lengths

    def offsets_or_none(self) -> Optional[torch.Tensor]:
        return self._offsets

    def device(self) -> torch.device:
        return self._values.device

    def size_in_bytes(self) -> int:
        """Bytes of the values, weights, and whichever of lengths and offsets are held."""
        return size_in_bytes(self._values, self._weights, self._lengths, self._offsets)

    def to_dense(self) -> List[torch.Tensor]:
        """One ``[L_b]`` tensor per bag."""
        return list(torch.split(self._values, self.lengths().tolist()))

    def to_dense_weights(self) -> Optional[List[torch.Tensor]]:
        if self._weights is None:
            return None
        return list(torch.split(self._weights, self.lengths().tolist()))

    def _padded(self, source: torch.Tensor, desired_length: Optional[int], padding_value: float) -> torch.Tensor:
        """``[B, L]`` for ``[N]`` source, ``[B, L, D]`` for ``[N, D]``."""
        lengths = self.lengths().long()
        num_bags = lengths.numel()
        width = int(lengths.max()) if desired_length is None and num_bags else (desired_length or 0)
        out = torch.full((num_bags, width, *source.shape[1:]), padding_value, dtype=source.dtype,
                         device=source.device)
        # values past the last bag are allowed (TorchRec's are), hence no output_size here
        bag = repeat_counts(torch.arange(num_bags, device=source.device), lengths)
        position = torch.arange(bag.numel(), device=source.device) - self.offsets().long()[bag]
        keep = position < width
        out[bag[keep], position[keep]] = source[:bag.numel()][keep]
        return out

    def to_padded_dense(self, desired_length: Optional[int] = None, padding_value: float = 0.0) -> torch.Tensor:
        """``[B, L]`` values, truncated or padded to ``desired_length`` (default: the longest bag)."""
        return self._padded(self._values, desired_length, padding_value)

    def to_padded_dense_weights(self, desired_length: Optional[int] = None,
                                padding_value: float = 0.0) -> Optional[torch.Tensor]:
        if self._weights is None:
            return None
        return self._padded(self._weights, desired_length, padding_value)

    def to(self, device: torch.device, non_blocking: bool = False) -> "JaggedTensor":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return JaggedTensor(move(self._values), move(self._weights), move(self._lengths), move(self._offsets))

    def __str__(self) -> str:
        offsets = self.offsets().tolist()
        body = _feature_string(self._values, self._weights, offsets, 0, len(offsets) - 1, "")
        if self._weights is not None:
            body = body[2:-2]  # TorchRec prints weighted JTs without the inner braces
            return "JaggedTensor({\n" + body + "\n})\n"
        return "JaggedTensor({\n    " + body + "\n})\n"


# --- pytree: lets torch.compile and torch.export take JaggedTensors as inputs and outputs ---
# Only tensors are leaves.

def _jt_flatten(jt: JaggedTensor):
    return [jt.values(), jt.weights_or_none(), jt.lengths_or_none(), jt.offsets_or_none()], None


def _jt_unflatten(children, _context) -> JaggedTensor:
    return JaggedTensor(*children)


def flatten_with_keys_fn(flatten, names):
    """A ``flatten_with_keys_fn`` for pytree registration: ``flatten``'s children, named."""
    def flatten_with_keys(obj):
        children, context = flatten(obj)
        return [(pytree.GetAttrKey(n), c) for n, c in zip(names, children)], context
    return flatten_with_keys


JAGGED_FIELDS = ("_values", "_weights", "_lengths", "_offsets")
pytree.register_pytree_node(JaggedTensor, _jt_flatten, _jt_unflatten,
                            serialized_type_name="jaggedrec.JaggedTensor",
                            flatten_with_keys_fn=flatten_with_keys_fn(_jt_flatten, JAGGED_FIELDS))
# torch.export.save pickles a program's example inputs; this lets torch.load(weights_only=True),
# which export's loader tries first, rebuild them (they hold only tensors, ints, strings, lists)
torch.serialization.add_safe_globals([JaggedTensor])
