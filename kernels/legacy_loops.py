"""The gather and run loops as they were before they loaded one step ahead, and their switch.

``pooled_fwd._gather``, ``row_runs.run_sums`` and ``row_runs._long_run_sums_kernel`` load the
next step's ids (or gradient-row offsets) and rows while they add the current ones, so that an iteration waits for one DRAM
round trip instead of two or more (``benchmarks/tools/codegen_report.py`` reads that off the
machine code). They add the same rows in the same order, so they give the same bits
(``tests/test_kernels_interpret.py`` checks it), but no GPU has yet timed the two on the same
inputs: the old loops stay, selectable, until one has (then this module goes).

``JAGGEDREC_LEGACY_LOOPS=1`` selects them: :func:`enabled` is the one switch, which the
launchers pass to the kernels as the ``LEGACY_LOOPS`` constexpr (a separate build, and a
separate autotuning key). The three places that branch on it call :func:`gather`,
:func:`run_sums` and :func:`long_run_sum` here.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def enabled() -> bool:
    """Whether launches take the old loops (``JAGGEDREC_LEGACY_LOOPS=1``); read at each launch."""
    return os.environ.get("JAGGEDREC_LEGACY_LOOPS", "0") == "1"


@triton.jit
def gather(acc, total_bad_ids, d0, cols, col_mask, starts, lengths, longest, num_rows, dim, table_ptr, values_ptr,
           psw_ptr, HAS_PSW: tl.constexpr, UNROLL: tl.constexpr):
    """``pooled_fwd._gather``'s old loop: each id is loaded just before its row, range-checked,
    and its bad ids are summed into ``total_bad_ids`` every step."""
    for j in range(0, longest, UNROLL):
        for u in tl.static_range(UNROLL):
            present = (j + u) < lengths
            ids = tl.load(values_ptr + starts + j + u, mask=present, other=0).to(tl.int64)
            bad = present & ((ids < 0) | (ids >= num_rows))
            present = present & ~bad
            if d0 == 0:
                total_bad_ids += tl.sum(bad.to(tl.int32), axis=0)
            row_mask = present[:, None]
            rows = tl.load(table_ptr + ids[:, None] * dim + cols[None, :],
                           mask=row_mask & col_mask[None, :], other=0.0).to(tl.float32)
            if HAS_PSW:
                psw = tl.load(psw_ptr + starts + j + u, mask=present, other=0.0).to(tl.float32)
                rows = rows * psw[:, None]
            acc += rows
    return acc, total_bad_ids


@triton.jit
def run_sums(acc, start, length, longest, cols, mask, grad_out_ptr, item_offset_ptr, item_scale_ptr,
             HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr, UNROLL: tl.constexpr):
    """``row_runs.run_sums``'s old loop: each gradient-row offset is loaded just before its row."""
    for j in range(0, longest, UNROLL):
        for k in tl.static_range(UNROLL):
            present = (j + k) < length
            item = start + j + k
            offset = tl.multiple_of(tl.load(item_offset_ptr + item, mask=present, other=0), DIM_ALIGN)
            grads = tl.load(grad_out_ptr + offset[:, None] + cols[None, :], mask=present[:, None] & mask, other=0.0)
            if HAS_SCALE:
                grads = grads * tl.load(item_scale_ptr + item, mask=present, other=0.0)[:, None]
            acc += grads
    return acc


@triton.jit
def long_run_sum(acc, start, end, cols, col_mask, grad_out_ptr, item_offset_ptr, item_scale_ptr,
                 HAS_SCALE: tl.constexpr, DIM_ALIGN: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``row_runs._long_run_sums_kernel``'s old loop: each block's offsets are loaded just before
    its rows, and its rows just before their sum."""
    for q0 in range(start, end, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        present = q < end
        offset = tl.multiple_of(tl.load(item_offset_ptr + q, mask=present, other=0), DIM_ALIGN)
        grads = tl.load(grad_out_ptr + offset[:, None] + cols[None, :],
                        mask=present[:, None] & col_mask[None, :], other=0.0)
        if HAS_SCALE:
            grads = grads * tl.load(item_scale_ptr + q, mask=present, other=0.0)[:, None]
        acc += tl.sum(grads, axis=0)
    return acc
