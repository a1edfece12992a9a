"""Busy processes beside a timed run (``jaggedrec-bench --busy N``).

A training step on a shared machine rarely has the cores to itself: data-loader workers,
another job, a notebook. ``busy_processes(n)`` starts ``n`` processes that each keep one core
busy for as long as the ``with`` block runs, so that a provider's time beside them shows how
it copes when a core is taken (how it splits work over threads, whether its threads spin).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Iterator, List

# a plain Python loop: one core's worth of work that touches no memory worth mentioning
_SPIN = "while True:\n    pass\n"


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[List[subprocess.Popen]]:
    """Run the block beside ``n`` busy processes (none for ``n <= 0``); they are killed when
    the block ends, however it ends."""
    procs: List[subprocess.Popen] = []
    try:
        for _ in range(max(0, n)):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if procs:
            time.sleep(0.2)  # let them get scheduled before the first timed step
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
