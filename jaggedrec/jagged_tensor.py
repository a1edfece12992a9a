"""``JaggedTensor``: one jagged feature over a batch, with TorchRec's API, and the helpers
that ``KeyedJaggedTensor`` (in ``keyed_jagged_tensor.py``) shares.

The tensors are the only required state; lengths and offsets are derived from each other
on first use and cached.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.utils._pytree as pytree

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_integer(tensor: Optional[torch.Tensor], name: str, owner: str) -> None:
    if tensor is not None and tensor.dtype not in _INT_DTYPES:
        raise TypeError(f"{owner}: {name} must be an integer tensor, got {tensor.dtype}")


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


@dataclasses.dataclass(init=False, repr=False, eq=False)
class JaggedTensor:
    """One feature for a batch: bag ``b`` holds ``values[offsets[b]:offsets[b+1]]``.

    Args:
        values: ``[N]`` ids (or any values).
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
    def empty(is_weighted: bool = False, device: Optional[torch.device] = None) -> "JaggedTensor":
        zero = torch.zeros(1, dtype=torch.long, device=device)
        return JaggedTensor(torch.empty(0, dtype=torch.long, device=device),
                            weights=torch.empty(0, device=device) if is_weighted else None,
                            lengths=zero[:0], offsets=zero)

    @staticmethod
    def from_dense(values: List[torch.Tensor], weights: Optional[List[torch.Tensor]] = None) -> "JaggedTensor":
        """One tensor per bag -> JaggedTensor. ``values[b]`` is ``[L_b]``."""
        lengths = torch.tensor([v.numel() for v in values], dtype=torch.long,
                               device=values[0].device if values else None)
        return JaggedTensor(torch.cat(values) if values else torch.empty(0, dtype=torch.long),
                            weights=torch.cat(weights) if weights is not None else None, lengths=lengths)

    @staticmethod
    def from_dense_lengths(values: torch.Tensor, lengths: torch.Tensor,
                           weights: Optional[torch.Tensor] = None) -> "JaggedTensor":
        """``[B, L]`` padded values and ``[B]`` lengths -> JaggedTensor of the first ``lengths[b]`` of each row."""
        mask = torch.arange(values.size(1), device=values.device) < lengths.unsqueeze(-1)
        return JaggedTensor(values[mask], weights=weights[mask] if weights is not None else None,
                            lengths=lengths)

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

    def to_dense(self) -> List[torch.Tensor]:
        """One ``[L_b]`` tensor per bag."""
        return list(torch.split(self._values, self.lengths().tolist()))

    def to_dense_weights(self) -> Optional[List[torch.Tensor]]:
        if self._weights is None:
            return None
        return list(torch.split(self._weights, self.lengths().tolist()))

    def _padded(self, source: torch.Tensor, desired_length: Optional[int], padding_value: float) -> torch.Tensor:
        lengths = self.lengths().long()
        num_bags = lengths.numel()
        width = int(lengths.max()) if desired_length is None and num_bags else (desired_length or 0)
        out = torch.full((num_bags, width), padding_value, dtype=source.dtype, device=source.device)
        bag = torch.repeat_interleave(torch.arange(num_bags, device=source.device), lengths,
                                      output_size=source.numel())
        position = torch.arange(source.numel(), device=source.device) - self.offsets().long()[bag]
        keep = position < width
        out[bag[keep], position[keep]] = source[keep]
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
    return [jt._values, jt._weights, jt._lengths, jt._offsets], None


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
