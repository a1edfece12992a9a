"""Running a test body on W gloo ranks: one spawned process per rank, a free port each time,
and a deadline, so that a hang fails the test instead of stalling the suite.

``run_ranks(worker, world_size, *args)`` (gloo; ``backend="nccl"``: one GPU per rank) calls
``worker(rank, world_size, *args)`` on every rank after ``init_process_group`` and returns
the ranks' return values, rank by rank. An exception on any rank fails the call with that
rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: Callable, rank: int, world_size: int, port: int, results, collective_timeout: float,
           backend: str, args) -> None:
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        results.put((rank, True, worker(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(worker: Callable, world_size: int, *args, timeout: float = 180.0,
              collective_timeout: float = 60.0, backend: str = "gloo") -> List[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world_size, port, results, collective_timeout, backend, args),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    out: dict = {}
    try:
        while len(out) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish within "
                                     f"{timeout} s (a hang?); finished: {sorted(out)}")
            try:
                rank, ok, value = results.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out and p.exitcode]
                if dead:
                    raise AssertionError(f"ranks {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                continue
            out[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failed = [(r, v) for r, (ok, v) in sorted(out.items()) if not ok]
    if failed:
        raise AssertionError("\n".join(f"--- rank {r} failed:\n{v}" for r, v in failed))
    return [out[r][1] for r in range(world_size)]
