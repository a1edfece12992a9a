"""Independent pieces of CPU work (one table's update, one feature's bags) shared out to
worker threads that each run torch ops on one core.

Why not torch's own intra-op threads: every parallel op splits its work evenly over the
OpenMP threads, then waits for the last one. When another process holds a core, the thread
that shares it finishes late and every op of the step waits for it, spinning; a fused train
step beside one busy process took 3.9x its quiet time that way. Here each worker takes the
next piece when it is free, so a thread that is descheduled does less of the work instead of
stalling the rest, and the pieces, a table each, stay in one core's cache.

Workers set their own OpenMP thread count to one (the count is per thread): the ops they run
stay on their core. The calling thread waits without spinning. With one torch thread, or for
a single piece, the pieces run on the calling thread as they are.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from typing import Callable, List, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


class _Pool:
    """Daemon threads, each running one piece at a time with one OpenMP thread."""

    def __init__(self) -> None:
        self.tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self.threads: List[threading.Thread] = []
        self.lock = threading.Lock()

    def grow(self, size: int) -> None:
        with self.lock:
            if len(self.threads) >= size:
                return
            ready = threading.Barrier(size - len(self.threads) + 1)
            caller_threads = torch.get_num_threads()
            for _ in range(size - len(self.threads)):
                thread = threading.Thread(target=self._work, args=(ready,), daemon=True,
                                          name=f"jaggedrec-host-{len(self.threads)}")
                thread.start()
                self.threads.append(thread)
            ready.wait()
            # a worker's set_num_threads(1) also set the default that new threads start with;
            # the caller's own count is its own, but restore the default it had
            torch.set_num_threads(caller_threads)

    def _work(self, ready: threading.Barrier) -> None:
        # torch sets a thread's count from the process default on the thread's first query;
        # query first, or that later first query would undo the one set here
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        while True:
            job = self.tasks.get()
            if job is None:
                return
            job()


_POOL: Optional[_Pool] = None


def _reset_after_fork() -> None:
    # a forked child (a DataLoader worker) has none of the parent's threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _omp_set_num_threads():
    """libgomp's per-thread setter, or None (no OpenMP runtime in this process's namespace).

    torch.set_num_threads would also change the default that threads started later take;
    the OpenMP call changes only the calling thread's count."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        setter = ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], None
    return setter


_OMP_SET_NUM_THREADS = _omp_set_num_threads()
# MKL's sparse products (fused_torch's SGD update) run as many threads as the calling
# thread's MKL count, which torch.set_num_threads sets and the OpenMP setter does not. The
# caller sets it to one while it takes pieces too; threads started in that window would start
# with one thread (torch's setter also sets that default), and it is restored after.
_MKL = torch.backends.mkl.is_available()


def run_pieces(pieces: Sequence[Callable[[], T]]) -> List[T]:
    """Run each zero-argument callable once; returns their results in order.

    Spread over ``torch.get_num_threads()`` single-threaded workers (see the module's
    docstring), the calling thread one of them where its OpenMP count can be set on its own.
    The pieces must be independent: they run in any order, concurrently. An exception in a
    piece is raised here, once all pieces have finished.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(pieces))
    if workers <= 1 or torch.compiler.is_compiling():
        return [piece() for piece in pieces]
    global _POOL
    if _POOL is None:
        _POOL = _Pool()
    pool = _POOL
    caller_works = _OMP_SET_NUM_THREADS is not None
    helpers = workers - 1 if caller_works else workers
    pool.grow(helpers)
    results: List[object] = [None] * len(pieces)
    errors: List[BaseException] = []
    next_piece = iter(range(len(pieces)))
    claim = threading.Lock()
    done = threading.Semaphore(0)
    grad_enabled = torch.is_grad_enabled()  # thread-local: the workers take the caller's

    def drain() -> None:
        # take pieces until none is left: a late worker simply takes fewer
        with torch.set_grad_enabled(grad_enabled):
            while True:
                with claim:
                    i = next(next_piece, None)
                if i is None:
                    break
                try:
                    results[i] = pieces[i]()
                except BaseException as e:  # noqa: BLE001 - re-raised by the caller below
                    errors.append(e)
        done.release()

    for _ in range(helpers):
        pool.tasks.put(drain)
    if caller_works:
        # the caller is running already: it takes pieces too, on one OpenMP thread, rather
        # than wake one more worker and wait for it to be scheduled
        _OMP_SET_NUM_THREADS(1)
        if _MKL:  # MKL keeps its own count per thread, which only torch's setter reaches
            torch.set_num_threads(1)
        try:
            drain()
        finally:
            _OMP_SET_NUM_THREADS(threads)
            if _MKL:
                torch.set_num_threads(threads)
    for _ in range(workers):
        done.acquire()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
