"""What a sharded step sends and how long it waits on collectives, counted at ``torch.distributed``.

:class:`CollectiveCounter` replaces the collectives of the ``torch.distributed`` namespace with
counting wrappers for as long as it is installed. Both sharded providers reach their
collectives through that namespace (``jaggedrec.distributed.comm``'s ``dist.all_to_all_single``,
TorchRec's ``comm_ops`` and ``dist_data``, DDP's Python comm hooks), so one counter sees both
the same way. While ``active`` it adds up, per rank:

* bytes sent to other ranks, from each call's tensors and splits (what the rank's own slice
  of an all-to-all keeps is not sent): all-to-all, the splits for other ranks; all-gather,
  the input to each of the W-1 others; reduce-scatter, the W-1 of W input blocks that belong
  to others; all-reduce, ``2 (W-1) / W`` of the tensor (a ring's reduce-scatter then
  all-gather); broadcast, the tensor to the W-1 others, from the source only;
* seconds spent inside those calls and inside ``wait()`` on the works they return (an
  asynchronous call's launch, then its wait). On CUDA both are timed after a device
  synchronize, because there a wait only orders streams and returns at once.

Calls that bypass the namespace are not seen: functional collectives
(``torch.distributed._functional_collectives``, taken under ``torch.compile``) and DDP's
built-in C++ all-reduce (hence :func:`collectives.route_ddp_allreduce`, which routes it through
a Python hook).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist

from .collectives import PatchedCollectives, WrappedWork


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _arg(args, kwargs, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


def _all_to_all_single(world, rank, args, kwargs):
    inp = _arg(args, kwargs, 1, "input")
    splits = _arg(args, kwargs, 3, "input_split_sizes")
    if not splits:  # equal blocks along dim 0
        return _bytes(inp) * (world - 1) // world
    row = _bytes(inp) // inp.shape[0] if inp.shape[0] else 0
    return (sum(splits) - splits[rank]) * row


def _list_except_own(index: int, name: str):
    def sent(world, rank, args, kwargs):
        return sum(_bytes(t) for r, t in enumerate(_arg(args, kwargs, index, name)) if r != rank)
    return sent


def _to_each_other(name: str):
    def sent(world, rank, args, kwargs):
        return _bytes(_arg(args, kwargs, 1, name)) * (world - 1)
    return sent


def _scattered(world, rank, args, kwargs):
    return _bytes(_arg(args, kwargs, 1, "input")) * (world - 1) // world


def _all_reduce(world, rank, args, kwargs):
    return 2 * _bytes(_arg(args, kwargs, 0, "tensor")) * (world - 1) // world


def _broadcast(world, rank, args, kwargs):
    src = _arg(args, kwargs, 1, "src")
    src = kwargs.get("group_src", 0) if src is None else src
    return _bytes(_arg(args, kwargs, 0, "tensor")) * (world - 1) if rank == src else 0


# collective -> (bytes this rank sends to the others, from (world, rank, args, kwargs);
#                the position of its ``group`` argument)
_SENT: Dict[str, Tuple[Callable, int]] = {
    "all_to_all_single": (_all_to_all_single, 4),
    "all_to_all": (_list_except_own(1, "input_tensor_list"), 2),
    "all_gather": (_to_each_other("tensor"), 2),
    "all_gather_into_tensor": (_to_each_other("input_tensor"), 2),
    "all_gather_single": (_to_each_other("input_tensor"), 2),
    "reduce_scatter": (_list_except_own(1, "input_list"), 3),
    "reduce_scatter_tensor": (_scattered, 3),
    "reduce_scatter_single": (_scattered, 3),
    "all_reduce": (_all_reduce, 2),
    "broadcast": (_broadcast, 2),
}


class _TimedWork(WrappedWork):
    """A collective's work whose ``wait()`` adds to the counter."""

    def __init__(self, work: dist.Work, counter: "CollectiveCounter") -> None:
        super().__init__(work)
        self._counter = counter

    def wait(self, *args, **kwargs):
        begin = self._counter.now()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._counter.wait_s += self._counter.now() - begin


class CollectiveCounter(PatchedCollectives):
    """Counts bytes sent and seconds waited in ``torch.distributed``'s collectives while
    ``active``; use it as a context manager (``with CollectiveCounter(cuda) as c``)."""

    names = tuple(_SENT)

    def __init__(self, cuda: bool = False) -> None:
        super().__init__()
        self.cuda = cuda
        self.bytes_sent = 0
        self.wait_s = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.bytes_sent, self.wait_s, self.calls = 0, 0.0, 0

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        sent, group_at = _SENT[name]

        def counted(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            group = _arg(args, kwargs, group_at, "group")
            self.bytes_sent += sent(dist.get_world_size(group), dist.get_rank(group), args, kwargs)
            self.calls += 1
            begin = self.now()
            try:
                work = fn(*args, **kwargs)
            finally:
                self.wait_s += self.now() - begin
            return _TimedWork(work, self) if work is not None else None

        return counted
