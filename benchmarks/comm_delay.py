"""A set latency on every collective, injected at ``torch.distributed``, for the pipeline benchmark.

Two CPU cores cannot show a pipeline's overlap from compute alone: a gloo all-to-all of a
few kilobytes between two local processes completes in microseconds. :class:`DelayedCollectives`
makes each collective take at least ``delay_ms`` from issue to completion, as a slow network
would, so that a pipeline that issues a collective early and waits for it late hides part
of the delay, and a loop that waits at once pays all of it:

* an asynchronous call (``async_op=True``, a ``Work`` back) returns a :class:`DelayedWork`
  whose ``wait()`` returns no earlier than the issue time plus the delay (whatever time
  passed between the issue and the wait is not paid again);
* a synchronous call sleeps, after the collective has completed, for what is left of the
  delay since its issue.

Both sharded libraries reach their collectives through the ``torch.distributed`` namespace
(jaggedrec's ``distributed/comm.py``: ``all_to_all_single``, ``reduce_scatter_single`` or
``reduce_scatter_tensor``, ``all_gather_single`` or ``all_gather_into_tensor``; TorchRec's
``comm_ops.py`` and ``dist_data.py``: ``all_to_all_single``, ``reduce_scatter_tensor``,
``all_gather_into_tensor``, ``reduce_scatter``, ``all_gather``), and so do DDP's Python comm
hooks (``all_reduce``), so one wrapper delays both alike. It also counts the calls per name
and the seconds the caller was blocked (inside a synchronous call, or inside ``wait()``),
which is the benchmark's wait share.

Not delayed: calls that bypass the namespace (``torch.distributed._functional_collectives``,
which TorchRec takes only under ``torch.compile`` or with its sync-collectives switch on;
DDP's built-in C++ all-reduce, hence :func:`collectives.route_ddp_allreduce`), and anything while the
wrapper is not ``active`` (the benchmark's own barriers and gathers). On CUDA a ``wait()``
only orders streams, so the delay and the blocked time are the host's view there.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .collectives import PatchedCollectives, WrappedWork

#: the collectives wrapped, every one both libraries and DDP's Python hooks may call
COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_reduce", "broadcast")


class DelayedWork(WrappedWork):
    """A collective's work that completes no earlier than ``deadline`` (``time.perf_counter``
    seconds): the methods that report completion honour the deadline, the others go to the
    wrapped work."""

    def __init__(self, work: dist.Work, deadline: float, owner: "DelayedCollectives", name: str = "") -> None:
        super().__init__(work)
        self._deadline, self._owner, self._name = deadline, owner, name

    def wait(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._owner.sleep_until(self._deadline)
            self._owner.add_blocked(self._name, time.perf_counter() - begin)

    def is_completed(self) -> bool:
        return self._work.is_completed() and time.perf_counter() >= self._deadline

    def get_future(self):
        """The wrapped work's future, completed no earlier than the deadline (a timer thread
        sets it, so the thread that completes the collective is not held). On CUDA the
        wrapped future itself: its value carries stream semantics a plain future would drop."""
        inner = self._work.get_future()
        if self._owner.cuda:
            return inner
        out = torch.futures.Future()

        def finish(done) -> None:
            try:
                out.set_result(done.value())
            except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
                out.set_exception(e)

        def on_done(done) -> None:
            left = self._deadline - time.perf_counter()
            if left > 0:
                timer = threading.Timer(left, finish, args=(done,))
                timer.daemon = True
                timer.start()
            else:
                finish(done)

        inner.add_done_callback(on_done)
        return out


class DelayedCollectives(PatchedCollectives):
    """``torch.distributed``'s collectives, each delayed by ``delay_ms`` and counted while
    ``active``; a context manager (``with DelayedCollectives(20.0) as comm``).

    ``undelayed``: names of collectives that are counted and timed but not delayed, to find
    which of them a pipeline still pays for. ``calls``: calls per collective name;
    ``blocked_s``: seconds the callers spent inside synchronous calls and ``wait()`` (the
    delay's sleep included), and ``blocked_by_name`` the same per collective name. ``reset()``
    clears them.
    """

    names = COLLECTIVES

    def __init__(self, delay_ms: float = 0.0, cuda: bool = False, undelayed: Iterable[str] = ()) -> None:
        if delay_ms < 0:
            raise ValueError(f"the collective delay must be >= 0 ms, got {delay_ms}")
        unknown = sorted(set(undelayed) - set(COLLECTIVES))
        if unknown:
            raise ValueError(f"not a wrapped collective: {', '.join(unknown)} (they are {', '.join(COLLECTIVES)})")
        super().__init__()
        self.delay_s = delay_ms / 1e3
        self.cuda = cuda
        self.undelayed = frozenset(undelayed)  # counted and timed, never delayed (to find who pays)
        self.calls: Counter = Counter()
        self.blocked_by_name: Counter = Counter()
        self.blocked_s = 0.0

    @property
    def delay_ms(self) -> float:
        return self.delay_s * 1e3

    @delay_ms.setter
    def delay_ms(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"the collective delay must be >= 0 ms, got {value}")
        self.delay_s = value / 1e3

    def reset(self) -> None:
        self.calls.clear()
        self.blocked_by_name.clear()
        self.blocked_s = 0.0

    def add_blocked(self, name: str, seconds: float) -> None:
        self.blocked_s += seconds
        self.blocked_by_name[name] += seconds

    @staticmethod
    def sleep_until(deadline: float) -> None:
        left = deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def delayed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.calls[name] += 1
            issued = time.perf_counter()
            deadline = issued + (0.0 if name in self.undelayed else self.delay_s)
            work = fn(*args, **kwargs)
            if work is not None:  # asynchronous: the wait pays what is left of the delay
                return DelayedWork(work, deadline, self, name)
            self.sleep_until(deadline)  # synchronous: completed, now the rest of the delay
            self.add_blocked(name, time.perf_counter() - issued)
            return None

        delayed.__name__ = name
        return delayed
