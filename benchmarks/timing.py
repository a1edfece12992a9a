"""Clocks, quantiles, the copy-bandwidth yardstick and memory probes.

On CUDA a step is timed with CUDA events around it, after a synchronize, so the time
includes any host launch overhead that leaves the GPU idle (a per-table loop's cost). On
CPU it is ``time.perf_counter`` around the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import resource
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch


class Clock:
    """Times one call of ``fn`` in milliseconds on ``device``."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def time_ms(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def quantiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    """``(median, p20, p80)`` with linear interpolation between order statistics."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)

    def q(p: float) -> float:
        pos = p * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def plan_samples(step_ms: float, repeats: int, budget_s: float = 10.0, minimum: int = 3,
                 floor_s: float = 0.3) -> int:
    """Timed samples for a provider whose warm step takes ``step_ms``.

    ``repeats`` in general. Sub-millisecond steps are noisy, so cheap steps get more, up
    to ``floor_s`` seconds' worth (at most 10x ``repeats``). Slow steps (over ~1 s) get
    as many as fit in ``budget_s``, never fewer than ``minimum``, so a sweep stays bounded.
    """
    if step_ms <= 0:
        return repeats
    if step_ms * repeats < floor_s * 1e3:
        return min(10 * repeats, max(repeats, int(floor_s * 1e3 / step_ms)))
    if step_ms * repeats <= budget_s * 1e3:
        return repeats
    return max(minimum, min(repeats, int(budget_s * 1e3 / step_ms)))


def copy_bandwidth_gbps(device: str, megabytes: int, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` over ``megabytes`` MB, counting bytes read plus written.

    It is the roofline for a gather: an embedding lookup can at best stream rows as fast
    as a plain copy streams memory. Measured in the run, so it reflects the machine's
    state (and its noise) at that time.
    """
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, device=device)  # ones, not empty: touch every page before timing
    dst = torch.zeros_like(src)
    clock = Clock(device)
    for _ in range(2):
        dst.copy_(src)
    samples = [clock.time_ms(lambda: dst.copy_(src)) for _ in range(repeats)]
    median, _, _ = quantiles(samples)
    return 2 * n * 4 / (median * 1e-3) / 1e9


class MemoryProbe:
    """Extra memory one call allocates at its peak, in MB, beyond what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, the caching allocator's view).
    CPU: the process's resident-set high-water mark (``VmHWM``), reset first through
    ``/proc/self/clear_refs``. Before that, ``malloc_trim`` hands free heap pages back to
    the OS, so that memory the step reuses from earlier steps is counted when it is touched
    again. Still RSS-based, so approximate (page granularity, allocator caches). Where the
    reset is not possible, ``ru_maxrss`` serves, which only sees peaks above the process's
    previous peak, and ``exact`` is False.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.kind = "cuda max_memory_allocated" if self.cuda else "RSS high-water mark"
        self.exact = self.cuda or _reset_hwm()

    def measure(self, fn: Callable[[], None]) -> Optional[float]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        _malloc_trim()
        if self.exact and _reset_hwm():
            base = _proc_status_kb("VmRSS")
            fn()
            peak = _proc_status_kb("VmHWM")
        else:
            base = _proc_status_kb("VmRSS") or 0
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
        if base is None or peak is None:
            return None
        return max(0.0, (peak - base) / 1024)


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)``: return free heap pages to the OS; a no-op elsewhere."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def interleaved_order(providers: int, samples: int) -> List[int]:
    """The provider of each timed sample: every provider once per turn, for ``samples`` turns,
    in forward order on even turns and backward on odd ones, a backward turn starting one
    before the last provider and ending with it (``0 1 2 | 1 0 2 | 0 1 2``).

    One sample at a time, and never one right after a sample of the same provider: each sample
    follows some other provider's step, so every provider meets caches that another has just
    filled (its tables as cold as anyone's), and slow drift of a noisy machine spreads over all
    providers alike. A provider's sample right after its own found its tables warm: with plain
    forward and backward turns (``0 1 2 | 2 1 0``) the first and last providers took half their
    samples so, which read the tutorial preset's bare loop ~8% faster than it runs after another.
    """
    forward = list(range(providers))
    backward = list(range(providers - 2, -1, -1)) + forward[-1:]
    order: List[int] = []
    for turn in range(samples):
        order += forward if turn % 2 == 0 else backward
    return order
