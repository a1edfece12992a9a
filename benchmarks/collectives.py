"""What the benchmarks' collective wrappers share: a ``torch.distributed.Work`` that hands
everything to the work it wraps, a context manager that swaps ``torch.distributed``'s
collectives for wrapped ones and back, and DDP's all-reduce routed through that namespace.

Both sharded libraries call their collectives through the ``torch.distributed`` namespace,
so wrapping the names there reaches jaggedrec's and TorchRec's alike
(:class:`sharded_comm.CollectiveCounter` counts bytes and waits, :class:`comm_delay.DelayedCollectives`
adds a latency).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist


class WrappedWork(dist.Work):
    """A collective's work that forwards every method to the work it wraps; subclasses
    override what they measure or delay (``wait``, ...). A ``dist.Work`` itself, because
    TorchRec checks ``isinstance(work, dist.Work)`` before it waits."""

    def __init__(self, work: dist.Work) -> None:
        super().__init__()
        self._work = work


def _forward(name: str):
    def method(self, *args, **kwargs):
        return getattr(self._work, name)(*args, **kwargs)
    method.__name__ = name
    return method


for _name in ("block_current_stream", "boxed", "exception", "get_future", "get_future_result", "is_completed",
              "is_success", "result", "source_rank", "synchronize", "wait", "_get_duration", "_get_op_type"):
    setattr(WrappedWork, _name, _forward(_name))


class PatchedCollectives:
    """A context manager that replaces each of ``names`` in ``torch.distributed`` (those this
    torch has) by ``self.wrap(name, original)`` on entry and puts the originals back on exit.
    Subclasses define ``names`` and ``wrap``; a wrapper checks ``self.active`` itself."""

    names: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self.active = False
        self._saved: Dict[str, Callable] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        raise NotImplementedError

    def __enter__(self):
        for name in self.names:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                wrapped = self.wrap(name, fn)
                wrapped.__wrapped__ = fn
                setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


def route_ddp_allreduce(module: torch.nn.Module) -> int:
    """Give every ``DistributedDataParallel`` inside ``module`` the stock Python all-reduce hook
    (the average DDP otherwise computes in C++), so that its gradient all-reduce goes through
    ``torch.distributed.all_reduce``, where the wrappers see it. DDP still waits on it inside
    its reducer, through the hook's future. Returns how many were hooked."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    hooked = 0
    for m in module.modules():
        # TorchRec keeps a sharded collection's lookups, DDP-wrapped for data-parallel tables,
        # in a plain list, which modules() does not enter
        lookups = getattr(m, "_lookups", None)
        for candidate in [m] + (lookups if isinstance(lookups, list) else []):
            if isinstance(candidate, DistributedDataParallel):
                candidate.register_comm_hook(None, default_hooks.allreduce_hook)
                hooked += 1
    return hooked
