"""What the kernels share: the per-feature metadata layout, interpreter detection, block sizes, wrap_triton."""

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


# The per-feature metadata, ``[F, META_FIELDS]`` int64 (built by the op layer's
# ``FeatureTables.meta``): a kernel reads feature ``f``'s fields at ``meta_ptr + f * META_FIELDS
# + META_<FIELD>``, constexpr offsets, so the loads compile as they would with bare numbers.
META_WEIGHT_OFFSET: tl.constexpr = tl.constexpr(0)  # the table's element offset in the flat weights
META_DIM: tl.constexpr = tl.constexpr(1)            # the table's embedding dim
META_ROWS: tl.constexpr = tl.constexpr(2)           # the table's rows; ids outside [0, rows) are bad
META_OUT_COLUMN: tl.constexpr = tl.constexpr(3)     # the feature's first column of the pooled output
META_KEY: tl.constexpr = tl.constexpr(4)            # the feature's key among the KJT's keys
META_MEAN: tl.constexpr = tl.constexpr(5)           # 1 when the feature pools by MEAN, 0 by SUM
META_ROW_BASE: tl.constexpr = tl.constexpr(6)       # the table's first row in row-wise optimizer state
META_FIELDS: tl.constexpr = tl.constexpr(7)


@triton.jit
def feature_fields(meta, OFFSET_ALIGN: tl.constexpr, DIM_ALIGN: tl.constexpr):
    """The six fields of the metadata row at ``meta`` that a pooled forward reads: its table's
    first element (or byte), dim, rows, output column, key and MEAN flag, each a scalar. The
    layout's alignments are promised to the compiler, so that the rows and outputs move in
    vectors: the first element a multiple of ``OFFSET_ALIGN``, the dim and column of ``DIM_ALIGN``."""
    offset = tl.multiple_of(tl.load(meta + META_WEIGHT_OFFSET), OFFSET_ALIGN)
    dim = tl.multiple_of(tl.load(meta + META_DIM), DIM_ALIGN)
    num_rows = tl.load(meta + META_ROWS)
    out_column = tl.multiple_of(tl.load(meta + META_OUT_COLUMN), DIM_ALIGN)
    key = tl.load(meta + META_KEY)
    mean = tl.load(meta + META_MEAN)
    return offset, dim, num_rows, out_column, key, mean


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


@functools.lru_cache(maxsize=None)
def persistent_programs(device: torch.device) -> int:
    """Programs for a persistent grid, whose programs take turns over the work (tiles of
    runs, whose count stays on the device): about as many as the GPU keeps resident, 32 per
    multiprocessor. The grid must not depend on the work's size, which in a compiled graph
    is an unbacked symbol. Under the interpreter, where each program costs ~1 ms, two."""
    if interpreting() or device.type != "cuda":
        return 2
    return 32 * torch.cuda.get_device_properties(device).multi_processor_count
