"""Launch helpers shared by the kernels: interpreter detection, block sizes, wrap_triton."""

from __future__ import annotations

import functools
import os

import torch

import triton
import triton.language as tl

try:  # inside a triton_op body, launches must go through wrap_triton so torch.compile can trace them
    from torch.library import wrap_triton as _torch_wrap_triton
except ImportError:  # pragma: no cover - torch < 2.6
    _torch_wrap_triton = None


def wrap_triton(kernel):
    # interpreted kernels are never traced; torch 2.11's wrap_triton, outside a triton_op, would
    # try and fail on an autotuned one (torch 2.13 hands it back unwrapped, as here)
    if _torch_wrap_triton is None or interpreting():
        return kernel
    return _torch_wrap_triton(kernel)


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


def legacy_loops() -> bool:
    """JAGGEDREC_LEGACY_LOOPS=1 launches the gather and run loops as they were before they
    loaded ahead (see ``pooled_fwd._gather``), so that a GPU can time both on the same inputs."""
    return os.environ.get("JAGGEDREC_LEGACY_LOOPS", "0") == "1"


def block_d(max_dim: int) -> int:
    """Columns per tile: the widest dim rounded up to a power of two, at most 128; wider dims loop."""
    return max(16, min(128, triton.next_power_of_2(max_dim)))


@functools.lru_cache(maxsize=None)
def persistent_programs(device: torch.device) -> int:
    """Programs for a persistent grid, whose programs take turns over the work (tiles of
    runs, whose count stays on the device): about as many as the GPU keeps resident, 32 per
    multiprocessor. The grid must not depend on the work's size, which in a compiled graph
    is an unbacked symbol. Under the interpreter, where each program costs ~1 ms, two."""
    if interpreting() or device.type != "cuda":
        return 2
    return 32 * torch.cuda.get_device_properties(device).multi_processor_count
