"""What a train pipeline needs of the batches a data loader yields, without knowing their type.

A batch is anything with ``to(device, non_blocking=True)`` returning the batch on the device
(TorchRec's ``Pipelineable``: ``Batch``, a KJT, a dataclass of tensors); ``record_stream`` and
``pin_memory`` are used when it has them. The pipeline finds the KeyedJaggedTensors a batch
carries one level deep: the batch itself, or its dataclass fields, attributes, dict items or
sequence items (``kjt_fields``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, List, Optional, Tuple

import torch

from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor


def is_kjt(obj: Any) -> bool:
    """A KeyedJaggedTensor, jaggedrec's or another library's (TorchRec's, by its class name)."""
    return isinstance(obj, KeyedJaggedTensor) or any(c.__name__ == "KeyedJaggedTensor" for c in type(obj).__mro__)


def _children(batch: Any) -> Iterator[Tuple[str, Any]]:
    if isinstance(batch, dict):
        yield from ((str(k), v) for k, v in batch.items())
    elif isinstance(batch, (list, tuple)):
        names = getattr(batch, "_fields", None)  # a namedtuple's field names
        yield from ((names[i] if names else str(i), v) for i, v in enumerate(batch))
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        yield from ((f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch))
    elif hasattr(batch, "__dict__"):
        yield from ((k, v) for k, v in vars(batch).items() if not k.startswith("_"))


def kjt_fields(batch: Any) -> List[Tuple[str, Any]]:
    """``[(path, kjt)]``: the KJTs ``batch`` carries, in its own order (path ``""``: the batch
    itself)."""
    if is_kjt(batch):
        return [("", batch)]
    return [(name, value) for name, value in _children(batch) if is_kjt(value)]


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif is_kjt(obj):
        for name in ("values", "weights_or_none", "lengths_or_none", "offsets_or_none"):
            t = getattr(obj, name)()
            if t is not None:
                yield t
    elif depth < 2:
        for _, value in _children(obj):
            yield from _tensors(value, depth + 1)


def batch_bytes(batch: Any) -> int:
    """Bytes held by the tensors ``batch`` carries (each storage counted once)."""
    seen, total = set(), 0
    for t in _tensors(batch):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def to_device(batch: Any, device: torch.device, stream: Optional[torch.Stream]) -> Any:
    """``batch`` on ``device``, copied on ``stream`` (CUDA; None: the current one)."""
    if not hasattr(batch, "to"):
        raise TypeError(f"a train pipeline's batches need .to(device, non_blocking=True); got {type(batch).__name__}")
    if stream is None:
        return batch.to(device, non_blocking=True)
    with torch.cuda.stream(stream):
        return batch.to(device, non_blocking=True)


def wait_for_batch(batch: Any, stream: Optional[torch.Stream]) -> None:
    """Make the current stream wait for ``batch``'s copy on ``stream``, and tell the caching
    allocator that the current stream uses its memory (CUDA only; nothing on CPU)."""
    if stream is None:
        return
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    if hasattr(batch, "record_stream"):
        batch.record_stream(current)
