"""Step the touched rows of one block of tables (eager): sums, chunks, streamed or scattered.

Given a block's ids and the bag each was read in, :func:`update_touched_rows` sorts the ids
into runs of equal rows (``runs_torch``), sums each run's bag gradients with one
``embedding_bag`` and runs the optimizer (``fused_rules``) on those rows, a cache-sized chunk
at a time. Where many of the block's rows were touched, a chunk is a range of rows streamed
whole, in order (:func:`_step_row_range`); elsewhere only the touched rows are gathered and
written back, or, for steps that are a scaled gradient, added into where they lie
(:func:`_step_scattered_rows`). Plain fp32 SGD streamed is one sparse product that sums and
adds in a single pass over the rows (:func:`_add_run_sums`).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from jaggedrec.ops.fused_rules import (ADAM, ADAM_DECOUPLED, EXACT_ADAGRAD, EXACT_ADAGRAD_DECOUPLED, LAMB, LARS_SGD,
                                       PARTIAL_ROWWISE_ADAM, PARTIAL_ROWWISE_LAMB, ROWWISE_ADAGRAD,
                                       ROWWISE_ADAGRAD_COUNTER, ROWWISE_ADAGRAD_DECOUPLED, SGD, STATE_LAYOUT, StepRule,
                                       scaled_gradient, step_in_place)
from jaggedrec.ops.op_args import FusedStep
from jaggedrec.ops.pooled_plan import Pass, block_view
from jaggedrec.ops.runs_torch import RowRuns, row_runs, sort_rows


def state_views(fused: FusedStep, p: Pass, block_row_base: int):
    """The optimizer state of one block of tables, indexed by the block's rows: row-wise
    ``[R]``, element-wise ``[R, D]`` (``STATE_LAYOUT``); None where the optimizer keeps none.

    Args:
        p: a pass of the block; block_row_base: the block's first row in row-wise state.
    """
    layout = STATE_LAYOUT[fused.optimizer]
    views = [s.narrow(0, block_row_base, p.num_rows) if per == "row" else block_view(s, p)
             for s, per in zip((fused.state1, fused.state2), layout)]
    return tuple(views) + (None,) * (2 - len(views))


# Bytes of rows per chunk in the eager update: a chunk's rows, sums and temporaries stay
# in the cores' L2 between the sums, the arithmetic and the write back. On a 2-core EPYC
# (1 MB L2 each) at dim 64, 2 MB chunks stepped ~10% faster than 8 MB ones and no slower
# than 1 MB ones, where the per-chunk Python overhead starts to show.
_CHUNK_BYTES = 2 << 20
# Scattered rows, bytes of rows per chunk by optimizer: a chunk's rows, their state rows,
# sums and temporaries are gathered and written back apart, so all of them should stay in L2
# (2 MB a core on the Xeon) from gather to write back, with room to spare when other
# processes share the core; but each chunk costs ~10-15 ops (~10-60 us), which shows where
# many rows are touched. dlrm preset, 1 thread, thread CPU time, the whole train step with
# 1 MB / 512 kB / 256 kB chunks alternated in one process, 2-core Xeon
# (benchmarks/results/cpu-xeon-2core-2026-12-06-step-2): near quiet (load 1.5), SGD at 1 id per
# bag 22.4 / 21.5 / 22.7 ms, exact Adagrad (four [n, D] buffers) at 20 ids 477 / 466 / 481;
# loaded (load 8-10, caches contended), SGD 50.0 / 46.6 / 45.6, exact Adagrad at 20 ids
# 514 / 503 / 510 and in a worse hour 1181 / - / 998. Row-wise Adagrad at 20 ids (56k rows a
# table) paid more for the extra chunks than it gained (358 / 385 / 405, loaded), so it keeps
# 1 MB, as do the optimizers not measured.
_SCATTERED_CHUNK_BYTES = dict.fromkeys(STATE_LAYOUT, 1 << 20) | {SGD: 512 << 10, EXACT_ADAGRAD: 512 << 10}

# With at least this fraction of a block's rows touched, the rows are stepped whole, a chunk
# at a time, read and written in order, untouched ones left as they were; with fewer, only
# the touched rows are gathered and written back. In order, a table streams at ~50 GB/s on a
# 2-core EPYC; scattered rows were gathered at ~9 GB/s and written back at ~6, so at dim 64
# a touched row costs as much as ~6-10 streamed ones, but streaming also does the optimizer's
# math for every row. 26 x 100k x 64, batch 4096, uniform ids, streamed vs scattered step:
#   SGD:              34% touched 96 vs 112 ms, 56% 126 vs 155; zipf-like, 22%: ~10% slower
#   row-wise Adagrad: 34% touched 138 vs 117 ms, 56% 170 vs 187
#   Adam:             34% touched 366 vs 262 ms, 56% 364 vs 391
# The thresholds sit near the break-even points those imply (linear in between).
# SGD, row-wise and exact Adagrad (without weight decay) add their steps into scattered rows
# with one sparse add (fused_rules.scaled_gradient), no gather and write-back; dlrm preset on
# a 2-core Xeon, thread CPU time at 1 thread, loaded machine, streamed vs scattered step:
#   SGD:              56% touched 344 vs 338 ms, 87% 541 vs 613
#   row-wise Adagrad: 56% 542 vs 430 ms
#   exact Adagrad:    56% 945 vs 665 ms
_STREAM_MIN_TOUCHED = {SGD: 1 / 2, ROWWISE_ADAGRAD: 3 / 4, ADAM: 1 / 2, EXACT_ADAGRAD: 3 / 4, LARS_SGD: 1 / 2,
                       PARTIAL_ROWWISE_ADAM: 1 / 2, LAMB: 1 / 2, PARTIAL_ROWWISE_LAMB: 1 / 2,
                       ROWWISE_ADAGRAD_DECOUPLED: 1 / 2, ROWWISE_ADAGRAD_COUNTER: 1 / 2, ADAM_DECOUPLED: 1 / 2,
                       EXACT_ADAGRAD_DECOUPLED: 1 / 2}
# Plain SGD streamed as one sparse product (_add_run_sums) is a single pass over the rows, and
# streams from this share of its threshold: same machine, load ~14, backward streamed vs
# scattered: 18% of rows touched (5 ids per bag) 98 vs 85 ms, 33% (10) 116 vs 146.
_ONE_PASS_SHARE = 1 / 2


def update_touched_rows(block: torch.Tensor, states, ids: torch.Tensor, bags: torch.Tensor, grads: torch.Tensor,
                        per_sample_weights: Optional[torch.Tensor], rule: StepRule) -> None:
    """Eager: sort the ids into runs of equal rows, then per chunk of rows sum each row's
    gradient (one ``embedding_bag`` over ``grads``), step the rows and write them back.

    Args:
        block: ``[R, D]`` the weights of one dim block; ``states`` its optimizer state views.
        ids, bags: ``[N]`` block row and bag (row of ``grads``) of each id.
        grads: ``[B*K, D]`` fp32 bag gradients; ``per_sample_weights``: ``[N]`` fp32 or None.
        rule: the step, its hyper-parameters read to the host.
    """
    num_rows, dim = block.shape
    sorted_ids, order = sort_rows(ids, num_rows)
    alpha = _plain_sgd_alpha(rule, block, grads)
    min_touched = _STREAM_MIN_TOUCHED[rule.optimizer] * (1 if alpha is None else _ONE_PASS_SHARE)
    # with fewer ids than the threshold's rows, too few rows are touched: no need to count them
    stream = (ids.shape[0] >= num_rows * min_touched
              and int((sorted_ids[1:] != sorted_ids[:-1]).sum()) + 1 >= num_rows * min_touched)
    rows_per_chunk = max(1, (_CHUNK_BYTES if stream else _SCATTERED_CHUNK_BYTES[rule.optimizer]) // (dim * 4))
    # streamed, one run per row (empty for untouched rows): a chunk of runs is a range of rows
    runs = row_runs(sorted_ids, order, bags, per_sample_weights, num_rows, unique=not stream)
    # in the bags' dtype once, not converted by every chunk's embedding_bag
    run_offsets = runs.run_offsets.to(runs.bags.dtype)
    if stream and alpha is not None:
        _add_run_sums(block, run_offsets, runs, grads, alpha)
        return
    num_runs = run_offsets.shape[0] - 1
    rows = None if stream else runs.rows.long()  # the rows' index dtype once, not per chunk
    chunk_starts = list(range(0, num_runs, rows_per_chunk)) + [num_runs]
    first_ids = run_offsets[chunk_starts].tolist()
    for lo, hi, a, b in zip(chunk_starts, chunk_starts[1:], first_ids, first_ids[1:]):
        if a == b:
            continue
        sums = F.embedding_bag(runs.bags[a:b], grads, run_offsets[lo:hi + 1] - a, mode="sum", include_last_offset=True,
                               per_sample_weights=None if runs.per_sample_weights is None
                               else runs.per_sample_weights[a:b])  # [hi-lo, D]
        if stream:
            # (SGD with max_norm too: untouched rows must not be renormalised)
            touched = (run_offsets[lo + 1:hi + 1] > run_offsets[lo:hi]
                       if rule.optimizer != SGD or len(rule.hparams) > 6 else None)
            _step_row_range(block, states, lo, hi, sums, touched, rule)
        else:
            _step_scattered_rows(block, states, rows[lo:hi], sums, rule)


# MKL's sparse-times-dense product, where torch has it: sums each row's run of bag gradients
# and adds it into the row in one pass over the rows. It must round as the chunked sums and
# add do (streamed and scattered steps agree bit for bit); MKL picks its kernel by shape, and
# on a Sapphire Rapids Xeon dims 4, 8, 16 and 24 rounded otherwise, so each dim is checked once
# (:func:`_run_sums_round_alike`) and falls back where it differs.
_CSR_ADD = torch.backends.mkl.is_available()
if _CSR_ADD:
    with warnings.catch_warnings():  # torch warns once that sparse CSR tensors are in beta
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                torch.zeros(0), (1, 1), check_invariants=False)


def _plain_sgd_alpha(rule: StepRule, block: torch.Tensor, grads: torch.Tensor) -> Optional[float]:
    """``-lr`` where the step is plain SGD on fp32 rows and :func:`_add_run_sums` can make it,
    else None."""
    if not _CSR_ADD or rule.optimizer != SGD or block.dtype != torch.float32 or not grads.is_contiguous():
        return None
    alpha = scaled_gradient(rule, None, None)  # SGD: -lr, reading no gradient; None with options
    return alpha if alpha is not None and _run_sums_round_alike(block.shape[1]) else None


@functools.lru_cache(maxsize=None)
def _run_sums_round_alike(dim: int) -> bool:
    """Whether, at this dim, :func:`_add_run_sums` gives the bits of ``embedding_bag`` sums
    added with ``w.add_(sums, alpha)``, with and without per-id weights, on seeded data."""
    gen = torch.Generator().manual_seed(dim)
    rows, num_bags, n = 96, 64, 600
    sorted_ids = torch.sort(torch.randint(0, rows, (n,), generator=gen, dtype=torch.int32)).values
    run_offsets = F.pad(torch.bincount(sorted_ids, minlength=rows).cumsum(0), (1, 0)).to(torch.int32)
    bags = torch.randint(0, num_bags, (n,), generator=gen, dtype=torch.int32)
    grads = torch.randn(num_bags, dim, generator=gen)
    block = torch.randn(rows, dim, generator=gen)
    for weights in (None, torch.rand(n, generator=gen)):
        sums = F.embedding_bag(bags, grads, run_offsets, mode="sum", include_last_offset=True,
                               per_sample_weights=weights)
        in_one_pass = block.clone()
        _add_run_sums(in_one_pass, run_offsets, RowRuns(None, run_offsets, bags, weights), grads, -0.37)
        if not torch.equal(in_one_pass, block.clone().add_(sums, alpha=-0.37)):
            return False
    return True


def _add_run_sums(block, run_offsets, runs: RowRuns, grads, alpha: float) -> None:
    """Streamed plain SGD: every row ``r`` of ``block`` (``[R, D]``) gets ``alpha *
    sum(grads[runs.bags[i]] * weight[i])`` over its run ``i`` in ``run_offsets[r]:
    run_offsets[r+1]`` (``[R+1]``), as one product of a ``[R, B]`` sparse matrix (a row per
    table row, the run's bags as its columns) with ``grads`` (``[B, D]``), added in place. The
    chunked sums and add it replaces wrote and read back every row's sum, and read and wrote
    every row of the block: dlrm preset at 20 ids per bag (56% of rows touched), 1 thread,
    2-core Xeon at load ~14: the update 185 -> 130 ms a step, thread CPU time."""
    weights = runs.per_sample_weights
    if weights is None:
        weights = torch.ones(runs.bags.shape[0], dtype=torch.float32)
    runs_matrix = torch.sparse_csr_tensor(run_offsets, runs.bags, weights, (block.shape[0], grads.shape[0]),
                                          check_invariants=False)
    block.addmm_(runs_matrix, grads, alpha=alpha)


def _step_scattered_rows(block, states, rows, sums, rule: StepRule) -> None:
    """Step rows ``rows`` (``[U]``, distinct, ascending) with summed gradients ``sums``
    (``[U, D]``, consumed). Where the step is ``w += alpha * g'`` (:func:`scaled_gradient`),
    ``g'`` is added into the rows where they lie, one sparse add (a row's axpy per touched row):
    a third of the time of gathering the rows and writing them back, which the other steps do."""
    current = [None if s is None else s.index_select(0, rows) for s in states]
    store = None if states[0] is None else functools.partial(copy_rows, states[0], rows)
    alpha = scaled_gradient(rule, sums, current[0], store=store) if _all_fp32(block, *states) else None
    if alpha is not None:  # the state was written back by store (these optimizers keep no state2)
        # read the rows first with embedding_bag's gather, which keeps many rows in flight (one
        # bag: it writes one row); the add's row-by-row axpy then finds them in cache. dlrm
        # preset at 1 id per bag (4% of rows touched), 26 tables after a forward, 1 thread,
        # loaded 2-core Xeon: 16.8 -> 12.7 ms of sums and adds, thread CPU time
        F.embedding_bag(rows, block, _FIRST_OFFSET, mode="sum")
        block.add_(torch.sparse_coo_tensor(rows.unsqueeze(0), sums, block.shape, is_coalesced=True,
                                           check_invariants=False), alpha=alpha)
        return
    w = block.index_select(0, rows).float()
    step_in_place(rule, w, sums, *current)
    for dest, value in zip((block, *states), (w, *current)):
        if dest is not None:
            copy_rows(dest, rows, value.to(dest.dtype))


_FIRST_OFFSET = torch.zeros(1, dtype=torch.int64)


def copy_rows(dest: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``dest.index_copy_(0, rows, values)`` (``dest``: ``[R]`` or ``[R, D]``; ``rows``:
    ``[U]`` int64; ``values``: ``[U, ...]``, ``dest``'s dtype), the same bytes. Where the rows
    allow it, they are copied as rows of 16-byte complex numbers: torch's CPU ``index_copy_``
    moves one element at a time, so 4x wider elements move an fp32 row of 64 in about half the
    time (4096 scattered rows of 800k: 249 -> 125 us, 1 thread, loaded 2-core Xeon)."""
    if dest.dim() == 2 and _as_wide(dest) and _as_wide(values):
        dest, values = dest.view(torch.complex128), values.view(torch.complex128)
    dest.index_copy_(0, rows, values)


def _as_wide(t: torch.Tensor) -> bool:
    """Whether ``t`` (``[R, D]``) views as ``[R, D * itemsize / 16]`` complex128."""
    per = 16 // t.element_size()
    return (t.stride(1) == 1 and t.shape[1] % per == 0 and t.stride(0) % per == 0 and t.storage_offset() % per == 0
            and t.data_ptr() % 16 == 0)


def _all_fp32(*tensors) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in tensors)


def _step_row_range(block, states, lo, hi, sums, touched, rule: StepRule) -> None:
    """Step rows ``lo:hi`` in place with summed gradients ``sums`` (``[hi-lo, D]``, zero for
    untouched rows, consumed); ``touched``: ``[hi-lo]`` bool, or None for SGD, for which a
    zero gradient is no step."""
    w = block[lo:hi]
    if _all_fp32(block, *states):
        alpha = scaled_gradient(rule, sums, None if states[0] is None else states[0][lo:hi], touched)
        if alpha is not None:  # the same g' and add as the scattered rows' (bit for bit)
            w.add_(sums, alpha=alpha)
            return
    work = w if w.dtype == torch.float32 else w.float()
    step_in_place(rule, work, sums, *(None if s is None else s[lo:hi] for s in states), touched=touched)
    if work is not w:
        w.copy_(work)
