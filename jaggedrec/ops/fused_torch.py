"""The torch path of the fused optimizer step: update touched rows in the backward.

For each block of equal-dim tables, every id read by any pass is gathered into one list,
so that a row read by two features (one table, two keys) still gets one update with the
summed gradient. The ids are sorted, each row's gradient is summed with one
``embedding_bag`` over the output gradient, and the optimizer runs on those rows only, with
vectorised index ops: no loop over rows or tables. Eagerly, only the touched rows are
gathered, a cache-sized chunk at a time; in a compiled graph, whose shapes cannot depend on
the data, one slot per id stands in for the touched rows (see ``_update_runs_static``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import pooled_torch as pt

SGD, ROWWISE_ADAGRAD, ADAM = 1, 2, 3


def fused_update(grad_out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 per_sample_weights: Optional[torch.Tensor], plan: pt.PooledPlan, num_keys: int, optimizer: int,
                 hparams: torch.Tensor, step: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
                 row_bases: List[int]) -> None:
    """Apply ``optimizer`` to the rows of ``weights`` that this batch read, in place.

    Args:
        grad_out: ``[B, total_dim]`` gradient of the pooled output.
        weights, values, offsets, per_sample_weights, plan, num_keys: as in the forward.
        optimizer: 1 SGD, 2 row-wise Adagrad, 3 Adam (see ``kernels/pooled_fused.py``).
        hparams: ``[5]`` fp32 ``lr, eps, weight_decay, beta1, beta2``.
        step: ``[1]`` int64, incremented here.
        state1, state2: optimizer state (``[R]`` row-wise, or ``[W]`` element-wise), updated.
        row_bases: ``[F]`` first row of each feature's table in row-wise state.
    """
    step.add_(1)
    batch = (offsets.shape[0] - 1) // num_keys
    # statically_known_true: in a compiled graph the id count may be unbacked; the general
    # path below serves an empty batch too
    if statically_known_true(batch == 0) or statically_known_true(values.shape[0] == 0):
        return
    grad_out = grad_out.float()
    key_counts = pt._key_counts(offsets, batch, num_keys)
    bag_of_id = pt._bag_of_id(offsets, num_keys, batch, values.shape[0])
    inv_lengths = pt._inverse_lengths(plan, offsets, num_keys, batch)
    eager = pt._host_readable(values, offsets)
    passes_by_dim: Dict[int, list] = {}
    for p in plan.passes:
        passes_by_dim.setdefault(p.dim, []).append(p)
    for passes in passes_by_dim.values():
        ids, bags, psw, grads, live = [], [], [], [], []
        for j, p in enumerate(passes):
            pass_ids, in_pass = pt._shifted_ids(p, values, key_counts)
            pass_bags, pass_psw = bag_of_id + j * num_keys * batch, per_sample_weights
            if in_pass is not None and eager:  # keep only the ids this pass reads
                pass_ids, pass_bags = pass_ids[in_pass], pass_bags[in_pass]
                pass_psw = None if pass_psw is None else pass_psw[in_pass]
                in_pass = None
            elif in_pass is not None:  # static shapes: masked ids weigh nothing and touch nothing
                pass_psw = in_pass.float() if pass_psw is None else pass_psw * in_pass
            ids.append(pass_ids)
            bags.append(pass_bags)
            psw.append(pass_psw)
            grads.append(pt._bag_grads(p, grad_out, plan, inv_lengths, num_keys, batch))
            live.append(torch.ones_like(pass_ids, dtype=torch.bool) if in_pass is None else in_pass)
        weights_of_ids = None if all(w is None for w in psw) else torch.cat(
            [torch.ones_like(i, dtype=torch.float32) if w is None else w.float() for i, w in zip(ids, psw)])
        all_ids, all_bags, all_grads = (t[0] if len(t) == 1 else torch.cat(t) for t in (ids, bags, grads))
        p0 = passes[0]
        block = pt._block(weights, p0)
        states = _state_views(optimizer, state1, state2, p0, row_bases[p0.features[0]] - p0.key_row_base[p0.keys[0]])
        if eager:
            _update_touched_rows(block, states, all_ids, all_bags, all_grads, weights_of_ids, optimizer,
                                 hparams.tolist(), int(step))
        else:
            _update_runs_static(block, states, all_ids, all_bags, all_grads, weights_of_ids, torch.cat(live),
                                optimizer, hparams, step)


# Rows per chunk in the eager update: a chunk's rows, summed gradients and temporaries stay
# in the cores' L2 between the sums, the arithmetic and the write back. On a 2-core EPYC
# (1 MB L2 each) at dim 64, 2 MB chunks stepped ~10% faster than 8 MB ones and no slower
# than 1 MB ones, where the per-chunk Python overhead starts to show.
_CHUNK_BYTES = 2 << 20

# A chunk of rows with at least this many ids per row is stepped whole: its rows are read and
# written in order, untouched rows left as they were. Sparser chunks gather and write back
# only their touched rows. In order, a table streams at ~50 GB/s on a 2-core EPYC; gathering
# and writing back scattered rows ran at ~9 and ~6 GB/s, so at dim 64 a touched row costs as
# much as ~10 streamed ones (26 x 100k x 64, 20 ids per bag: 56% of rows touched, update
# 134 -> 48 ms). Each id touches at most one row, so 1/8 id per row means at most 1/8 of the
# chunk's rows touched.
_STREAM_MIN_IDS_PER_ROW = 1 / 8


def _update_touched_rows(block, states, ids, bags, grads, weights_of_ids, optimizer, hparams, step) -> None:
    """Eager: sort the ids into runs of equal rows, then per chunk of rows sum each row's
    gradient (one ``embedding_bag`` over ``grads``), step the rows and write them back.

    Args:
        block: ``[R, D]`` the weights of one dim block; ``states`` its optimizer state views.
        ids, bags: ``[N]`` block row and bag (row of ``grads``) of each id.
        grads: ``[B*K, D]`` fp32 bag gradients; ``weights_of_ids``: ``[N]`` fp32 or None.
    """
    num_rows, dim = block.shape
    rows_per_chunk = max(1, _CHUNK_BYTES // (dim * 4))
    # With few ids, runs only for touched rows (sorted); otherwise one run per row, empty for
    # untouched rows, so that a chunk of runs is a range of rows
    every_row = ids.shape[0] >= num_rows * _STREAM_MIN_IDS_PER_ROW
    runs = pt._row_runs(ids, bags, weights_of_ids, num_rows, unique=not every_row)
    num_runs = num_rows if every_row else runs.rows.shape[0]
    chunk_starts = list(range(0, num_runs, rows_per_chunk)) + [num_runs]
    first_ids = runs.run_offsets[chunk_starts].tolist()
    for lo, hi, a, b in zip(chunk_starts, chunk_starts[1:], first_ids, first_ids[1:]):
        if a == b:
            continue
        run_offsets = runs.run_offsets[lo:hi + 1]
        sums = F.embedding_bag(runs.bags[a:b], grads, run_offsets - a, mode="sum", include_last_offset=True,
                               per_sample_weights=None if runs.weights is None else runs.weights[a:b])  # [hi-lo, D]
        if not every_row:
            _step_scattered_rows(block, states, runs.rows[lo:hi].long(), sums, optimizer, hparams, step)
        elif b - a >= (hi - lo) * _STREAM_MIN_IDS_PER_ROW:
            _step_row_range(block, states, lo, hi, sums, run_offsets, optimizer, hparams, step)
        else:
            touched = torch.nonzero(run_offsets[1:] > run_offsets[:-1]).squeeze(1)
            _step_scattered_rows(block, states, touched + lo, sums.index_select(0, touched), optimizer, hparams,
                                 step)


def _step_scattered_rows(block, states, rows, sums, optimizer, hparams, step) -> None:
    """Step rows ``rows`` (``[U]``, distinct) with summed gradients ``sums`` (``[U, D]``):
    gather them and their state, step, write back."""
    w = block.index_select(0, rows).float()
    if optimizer == SGD:  # in place: one pass over the chunk
        block.index_copy_(0, rows, w.add_(sums, alpha=-hparams[0]).to(block.dtype))
        return
    current = [None if s is None else s.index_select(0, rows) for s in states]
    new = _step_rows(optimizer, w, sums, *current, hparams, step)
    for dest, value in zip((block, *states), new):
        if dest is not None:
            dest.index_copy_(0, rows, value.to(dest.dtype))


def _step_row_range(block, states, lo, hi, sums, run_offsets, optimizer, hparams, step) -> None:
    """Step rows ``lo:hi`` in place with summed gradients ``sums`` (``[hi-lo, D]``, zero for
    untouched rows); ``run_offsets`` (``[hi-lo+1]``) bound each row's run of ids."""
    w = block[lo:hi]
    if optimizer == SGD:
        # an untouched row adds -lr * 0 and stays as it was, bit for bit
        if w.dtype == torch.float32:
            w.add_(sums, alpha=-hparams[0])
        else:
            w.copy_(w.float().add_(sums, alpha=-hparams[0]))
        return
    # weight decay and Adam's moment decay would move untouched rows: keep their old values
    touched = run_offsets[1:] > run_offsets[:-1]
    current = [None if s is None else s[lo:hi] for s in states]
    new = _step_rows(optimizer, w.float(), sums, *current, hparams, step)
    for dest, value in zip((w, *current), new):
        if dest is not None:
            keep = touched if dest.dim() == 1 else touched.unsqueeze(1)
            dest.copy_(torch.where(keep, value, dest.float()))


def _update_runs_static(block, states, ids, bags, grads, weights_of_ids, live, optimizer, hparams, step) -> None:
    """Compiled graphs: the same update with static shapes, over ``n`` slots for the ``n`` ids
    (the touched-row count stays on the device), touching only the rows the batch read.

    Sorted by row, the ids form runs; slot ``u`` of one ``embedding_bag`` over the runs holds
    run ``u``'s summed gradient. Every slot then steps a row and writes it back: slots past
    the live runs redo the last live run, so that duplicate writes to a row carry the same
    value and agree whatever their order. Cost follows the batch, not the tables: the
    whole-table masked update this replaced took 99 ms per compiled step at one id per bag
    (26 tables of 100k rows, eager 25 ms); now 19 ms (eager 18). At 20 ids per bag, 272 ms
    (eager 246; the masked update ~190).
    """
    num_rows, n = block.shape[0], ids.shape[0]
    device = ids.device
    # dead ids (keys outside their pass) sort last, past every row, in a run of their own
    keys = torch.where(live, ids, num_rows)
    sorted_rows, order = torch.sort(keys.to(torch.int32) if num_rows < 2**31 else keys.long(), stable=True)
    is_start = sorted_rows != F.pad(sorted_rows, (1, 0), value=-1)[:-1]
    positions = torch.arange(n, device=device)
    # run u starts at run_start[u]; entries past the runs hold n (each non-start scatters to a
    # scratch slot of its own past n)
    run_start = torch.full((2 * n + 1,), n, dtype=torch.int64, device=device)
    run_start.index_put_((torch.where(is_start, torch.cumsum(is_start, 0) - 1, n + 1 + positions),), positions)
    psw = None if weights_of_ids is None else weights_of_ids.index_select(0, order)
    sums = F.embedding_bag(bags.index_select(0, order), grads, run_start[:n + 1], mode="sum",
                           include_last_offset=True, per_sample_weights=psw)  # [n, D]
    num_live = (is_start & (sorted_rows < num_rows)).sum()
    any_live = num_live > 0  # with none, slot 0 rewrites row 0 as it is
    live_slot = positions < num_live
    last = (num_live - 1).clamp(min=0).reshape(1)
    rows = sorted_rows.index_select(0, run_start[:n].clamp(max=n - 1)).long()
    rows = torch.where(live_slot, rows, rows.index_select(0, last))
    rows = torch.where(any_live, rows, 0)
    # where, not a gather: compiled, the last live run's row broadcasts into the step's loop
    grads_of_rows = torch.where(live_slot.unsqueeze(1), sums, sums.index_select(0, last))
    w = block.index_select(0, rows).float()
    current = [None if s is None else s.index_select(0, rows) for s in states]
    new = _step_rows(optimizer, w, grads_of_rows, *current, hparams.unbind(), step.float())
    for dest, value, old in zip((block, *states), new, (w, *current)):
        if dest is not None:
            dest.index_put_((rows,), torch.where(any_live, value, old).to(dest.dtype))


def _state_views(optimizer, state1, state2, p: "pt._Pass", block_row_base: int):
    """The optimizer state of one block of tables, indexed by the block's rows: row-wise
    ``[R]``, element-wise ``[R, D]``; None where the optimizer keeps none."""
    if optimizer == ROWWISE_ADAGRAD:
        return state1.narrow(0, block_row_base, p.num_rows), None
    if optimizer == ADAM:
        return tuple(s.narrow(0, p.weight_start, p.num_rows * p.dim).view(p.num_rows, p.dim) for s in (state1, state2))
    return None, None


def _step_rows(optimizer, w, g, s1, s2, hparams, t):
    """One optimizer step for rows ``w`` (``[n, D]`` fp32) with summed gradients ``g``.

    ``hparams`` (lr, eps, weight_decay, beta1, beta2) and the step ``t`` are Python numbers
    eagerly and 0-d tensors in compiled graphs; the formulas serve both.
    Returns the new ``(w, s1, s2)``.
    """
    lr, eps, weight_decay, beta1, beta2 = hparams
    if optimizer == SGD:
        return w - lr * g, s1, s2
    g = g + weight_decay * w
    if optimizer == ROWWISE_ADAGRAD:
        s1 = s1 + g.square().mean(1)
        return w - (lr / (s1.sqrt() + eps)).unsqueeze(1) * g, s1, s2
    s1 = beta1 * s1 + (1 - beta1) * g
    s2 = beta2 * s2 + (1 - beta2) * g.square()
    return w - lr * (s1 / (1 - beta1 ** t)) / ((s2 / (1 - beta2 ** t)).sqrt() + eps), s1, s2
