"""How jaggedrec ops are registered with torch.library."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

try:  # Triton ships with torch's Linux wheels; elsewhere the ops fall back to plain custom ops.
    import triton  # noqa: F401
    from torch.library import triton_op, wrap_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False
    wrap_triton = None


def define_op(name: str, mutates_args: Iterable[str] = ()) -> Callable:
    """Register ``fn`` as the op ``name``.

    With Triton present this is a ``triton_op``: torch.compile traces into its body and
    sees the Triton launches, so the body doubles as the op's fake implementation and must
    compute output shapes from sizes alone. Without Triton it is an opaque ``custom_op``
    whose fake implementation is the same function run on fake tensors.
    """

    def decorate(fn: Callable):
        if HAS_TRITON:
            return triton_op(name, mutates_args=tuple(mutates_args))(fn)
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)
        op.register_fake(fn)
        return op

    return decorate


def define_host_op(name: str, mutates_args: Iterable[str] = (), fake: Optional[Callable] = None) -> Callable:
    """Register ``fn`` as an opaque op: it mutates ``mutates_args`` and returns None, or
    returns what ``fake`` (the same arguments, fake tensors) says it returns.

    torch.compile does not trace into it: a compiled graph calls it with real tensors, so its
    body may read device data to the host and pick shapes from the data, as eager code does.
    """

    def decorate(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)
        op.register_fake(fake if fake is not None else (lambda *args: None))
        return op

    return decorate
