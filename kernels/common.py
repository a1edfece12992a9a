"""Launch helpers shared by the kernels: interpreter detection, block sizes, wrap_triton."""

from __future__ import annotations

import functools
import os

import torch

import triton
import triton.language as tl

try:  # inside a triton_op body, launches must go through wrap_triton so torch.compile can trace them
    from torch.library import wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6
    def wrap_triton(kernel):
        return kernel

# Column layout of the per-feature metadata tensor, ``[F, META_FIELDS]`` int64: the table's
# element offset in the flat weights, dim, rows, the feature's output column, its KJT key,
# MEAN (1) or SUM (0), and the table's first row in row-wise optimizer state.
META_WEIGHT_OFFSET, META_DIM, META_ROWS, META_OUT_COLUMN, META_KEY, META_MEAN, META_ROW_BASE = range(7)
META_FIELDS: tl.constexpr = tl.constexpr(7)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where every program instance costs ~1 ms."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def single_config() -> bool:
    """One launch config, no autotuning: under the interpreter, and with JAGGEDREC_AUTOTUNE=0
    (correctness runs on a GPU, where each tuned config costs a compile)."""
    return interpreting() or os.environ.get("JAGGEDREC_AUTOTUNE", "1") == "0"


def block_d(max_dim: int) -> int:
    """Columns per tile: the widest dim rounded up to a power of two, at most 128; wider dims loop."""
    return max(16, min(128, triton.next_power_of_2(max_dim)))


def dim_alignment(dims) -> int:
    """The largest power of two, at most 16, dividing every dim. Table offsets (row-aligned
    in 32-element-aligned blocks) and output columns (sums of dims) are multiples of it too,
    so kernels may promise it to the compiler (``tl.multiple_of``), which then loads and
    stores each row in 16-byte vectors instead of one element at a time."""
    align = 16
    while any(d % align for d in dims):
        align //= 2
    return align


def grid_programs(device: torch.device, work_items: int, block: int) -> int:
    """Programs for ``work_items`` items, ``block`` per program per turn. On a GPU one
    program per block, up to 64 per multiprocessor (beyond that they take turns); under the
    interpreter, where each program costs ~1 ms, two that take turns."""
    needed = max(1, -(-work_items // block))
    if interpreting() or device.type != "cuda":
        return min(needed, 2)
    return min(needed, 64 * torch.cuda.get_device_properties(device).multi_processor_count)


@functools.lru_cache(maxsize=None)
def persistent_programs(device: torch.device) -> int:
    """Programs for a persistent grid: a few per multiprocessor, so that every SM stays busy
    while programs take turns over the work items (e.g. runs of equal rows)."""
    if interpreting() or device.type != "cuda":
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
