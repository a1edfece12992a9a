"""The torch path of the fused optimizer step: update touched rows in the backward.

For each block of equal-dim tables, every id read by any pass is gathered into one list,
so that a row read by two features (one table, two keys) still gets one update with the
summed gradient. The ids are sorted, each row's gradient is summed with one
``embedding_bag`` over the output gradient (see ``pooled_torch._sum_rows_by_id``), and the
optimizer runs on those rows only, with vectorised index ops: no loop over rows or tables.
Eagerly only the touched rows are gathered; in a compiled graph, whose shapes cannot depend
on the data, the whole block is updated under a "touched" mask instead.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
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
    bag_of_id = pt._bag_of_id(offsets, num_keys * batch, values.shape[0])
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
        all_ids, all_bags, all_grads = torch.cat(ids), torch.cat(bags), torch.cat(grads)
        p0 = passes[0]
        block = pt._block(weights, p0)
        block_row_base = row_bases[p0.features[0]] - p0.key_row_base[p0.keys[0]]
        if eager:
            rows, sums = pt._sum_rows_by_id(all_ids, all_bags, all_grads, weights_of_ids, p0.num_rows, unique=True)
            rows, mask = rows.long(), None
        else:
            _, sums = pt._sum_rows_by_id(all_ids, all_bags, all_grads, weights_of_ids, p0.num_rows, unique=False)
            counts = torch.zeros(p0.num_rows, dtype=torch.int64, device=all_ids.device)
            counts.scatter_add_(0, all_ids.long(), torch.cat(live).long())
            rows, mask = None, counts > 0
        _apply(block, rows, mask, sums, optimizer, hparams, step, state1, state2, p0, block_row_base)


def _apply(block: torch.Tensor, rows: Optional[torch.Tensor], mask: Optional[torch.Tensor], sums: torch.Tensor,
           optimizer: int, hparams: torch.Tensor, step: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor,
           p: "pt._Pass", block_row_base: int) -> None:
    """Update ``block`` (``[R, D]``) at ``rows`` (``[U]``, with ``sums`` ``[U, D]``), or at every
    row where ``mask`` (``[R]``) is set (with ``sums`` ``[R, D]``)."""
    lr, eps, weight_decay, beta1, beta2 = hparams.unbind()
    take = (lambda t: t.index_select(0, rows)) if rows is not None else (lambda t: t)
    w = take(block).float()
    g = sums if optimizer == SGD else sums + weight_decay * w
    updates = []  # (destination, new value)
    if optimizer == SGD:
        new_w = w - lr * g
    elif optimizer == ROWWISE_ADAGRAD:
        row_state = state1.narrow(0, block_row_base, p.num_rows)
        s = take(row_state) + g.square().mean(1)
        updates.append((row_state, s))
        new_w = w - (lr / (s.sqrt() + eps)).unsqueeze(1) * g
    else:
        moments = [s.narrow(0, p.weight_start, p.num_rows * p.dim).view(p.num_rows, p.dim) for s in (state1, state2)]
        m = beta1 * take(moments[0]) + (1 - beta1) * g
        v = beta2 * take(moments[1]) + (1 - beta2) * g.square()
        updates += [(moments[0], m), (moments[1], v)]
        t = step.float()
        new_w = w - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
    updates.append((block, new_w))
    for dest, value in updates:
        value = value.to(dest.dtype)
        if rows is not None:
            dest.index_copy_(0, rows, value)
        else:
            keep = mask if value.dim() == 1 else mask.unsqueeze(1)
            dest.copy_(torch.where(keep, value, dest))

