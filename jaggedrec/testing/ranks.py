"""A ``torch.distributed`` world of spawned processes, bounded in time.

``run_ranks(worker, world_size, *args)`` starts one process per rank, joins them
into a process group on a free local port (gloo; ``backend="nccl"``: one GPU per rank,
``cuda:rank``), calls ``worker(rank, world_size, *args)`` on each, and returns the ranks'
return values, rank by rank. The call never hangs: the group's collectives time out after
``collective_timeout`` seconds, and past ``timeout`` seconds, or when a rank raises or dies,
every rank is stopped and :class:`RankFailure` names the ranks and carries their tracebacks.

A rank may also hand values to the parent while it runs (``send_to_parent``), which
``on_message(rank, value)`` receives as they come: a long run then keeps what it finished
even when a later part fails or runs out of time.

Ranks are forked from a ``forkserver`` that imported torch and jaggedrec once per parent
process, so a launch does not pay every rank's imports again (on a loaded 2-core machine a
3-rank launch took 25-33 s with ``spawn``, 0.1-0.2 s after the first with the preloaded
server). The server forks before any CPU thread pool exists; where ``forkserver`` is missing
(Windows), ranks are spawned.
"""

from __future__ import annotations

import datetime
import queue
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

# in a rank's process: the queue to the parent, and this rank's number
_CHANNEL: Optional[tuple] = None


class RankFailure(RuntimeError):
    """A rank raised, died, or did not finish within the deadline."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_to_parent(value: Any) -> None:
    """Inside a worker of :func:`run_ranks`: hand ``value`` (picklable) to the parent's
    ``on_message`` now, before the worker returns."""
    if _CHANNEL is None:
        raise RuntimeError("send_to_parent is for a worker that run_ranks started")
    channel, rank = _CHANNEL
    channel.put(("message", rank, value))


def _entry(worker: Callable, rank: int, world_size: int, port: int, channel, backend: str, threads: Optional[int],
           collective_timeout: float, args: tuple) -> None:
    import torch.distributed as dist

    global _CHANNEL
    _CHANNEL = (channel, rank)
    if threads:
        torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        channel.put(("done", rank, worker(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops every rank
        channel.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_PRELOAD = ["torch", "torch.distributed", "jaggedrec", "jaggedrec.testing.ranks"]


def _context():
    import torch.multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when the server starts: the first launch
    return ctx


def run_ranks(worker: Callable, world_size: int, *args, timeout: Optional[float] = 180.0,
              collective_timeout: float = 60.0, backend: str = "gloo", threads: Optional[int] = 1,
              on_message: Optional[Callable[[int, Any], None]] = None) -> List[Any]:
    """``worker(rank, world_size, *args)`` on ``world_size`` spawned ranks; their return values.

    ``worker`` and ``args`` must be picklable (a module-level function). ``threads``: torch's
    CPU threads per rank (None: torch's default). ``timeout``: seconds for the whole run
    (None: no deadline, only the collectives' ``collective_timeout``). Raises
    :class:`RankFailure` when a rank raises (with every failed rank's traceback), exits
    before returning, or the deadline passes; every rank is stopped first.
    """
    ctx = _context()
    channel = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, daemon=True,
                         args=(worker, r, world_size, port, channel, backend, threads, collective_timeout, args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    grace = None  # after a first failure: a moment for the other ranks' own tracebacks
    returned: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    suspects: set = set()
    try:
        while len(returned) + len(errors) < world_size:
            now = time.monotonic()
            if grace is not None and now >= grace:
                break  # the others may wait on the failed rank until their collectives time out
            if deadline is not None and now >= deadline:
                missing = sorted(set(range(world_size)) - set(returned) - set(errors))
                raise RankFailure(f"ranks {missing} did not finish within {timeout:g} s (a hang?); stopped them"
                                  + _tracebacks(errors))
            wait = min(t - now for t in (now + 2.0, deadline, grace) if t is not None)
            try:
                kind, rank, value = channel.get(timeout=wait)
            except queue.Empty:
                dead = {r for r, p in enumerate(procs) if r not in returned and r not in errors and not p.is_alive()}
                # seen dead twice: a last message it put before exiting would have arrived by now
                if dead & suspects:
                    gone = sorted(dead & suspects)
                    raise RankFailure(f"ranks {gone} exited (codes {[procs[r].exitcode for r in gone]}) before "
                                      f"returning" + _tracebacks(errors))
                suspects = dead
                continue
            if kind == "message":
                if on_message is not None:
                    on_message(rank, value)
            elif kind == "done":
                returned[rank] = value
            else:
                errors[rank] = value
                grace = grace or time.monotonic() + 3.0
        if errors:
            raise RankFailure(_tracebacks(errors).lstrip("\n"))
    finally:
        finished = len(returned) == world_size
        for p in procs:
            p.join(timeout=10 if finished else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [returned[r] for r in range(world_size)]


def _tracebacks(errors: Dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} failed:\n{text}" for r, text in sorted(errors.items()))
