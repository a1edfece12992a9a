"""Column-wise shards stepped as whole rows: the exact step of a sharded collection's *exact*
tables (the bag collection's and the unpooled one's alike).

A fused optimizer that steps a row by sums over all of its columns (``needs_whole_rows``:
row-wise Adagrad's state, partial row-wise Adam's and LAMB's second moment, LARS-SGD's and
LAMB's norms) cannot step a column block alone. The tables a plan splits into column blocks
under such an optimizer (``ShardLayout.exact_tables``) live in a local collection of their
own, which only looks rows up; :class:`ExactColumns` steps it in the backward:

1. each shard sums its touched rows' gradients (duplicate ids summed in the unsharded step's
   order, so the sums are the same bit for bit; the rows are the same on every column block
   of a table, since every block reads the table's whole batch) and computes its part of
   their row sums (``fused_rules_rowwise.row_partials``). A bag collection's ids read their bag's
   gradient, an unpooled collection's each its own row's: only where a key's gradient rows
   lie differs (``ExactColumns(pooled=...)``);
2. one ``all_to_all`` per step sends each part to the other ranks that hold a block of the
   same table, and every holder adds the parts up in block order, so that every block gets
   the same sums, bit for bit;
3. each block steps its rows with the whole rows' sums (``fused_rules_rowwise.finish_rows``); the
   row-wise state, kept by every block, stays the same on all of them.

Every rank enters the all-to-all in every step, also one that holds no exact block or got
no ids: the step hangs off an autograd node that every rank's output dist's backward reaches
(as ``comm.joins_backward`` makes the output dist's own; the caller feeds the node's output,
empty as it may be, to the output dist), and the per-id weights' gradient waits for it (as
``comm.tie_backward``), so the collectives of the backward come in one order on every rank.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from jaggedrec.modules.embedding_configs import PoolingType
from jaggedrec.ops.weight_grads import clipped_grad
from jaggedrec.optim import FusedOptimizer
from jaggedrec.distributed.checkpoint import state_views
from jaggedrec.ops.fused_rules_rowwise import ROW_SUMS, finish_rows, row_partials
from jaggedrec.distributed.shard_layout import Shard, ShardLayout
from jaggedrec.sparse.jagged_tensor import repeat_counts

# config fields the exact step reads; any other set away from its default is refused
_STEPPED_FIELDS = frozenset(("lr", "max_gradient", "eps", "weight_decay", "weight_decay_mode", "betas", "eta",
                             "momentum"))


def check_exact(fused: FusedOptimizer, layout: ShardLayout) -> None:
    """Refuse an optimizer (or an option of it) that the exact step does not implement."""
    names = sorted(layout.configs[t].name for t in layout.exact_tables)
    if fused.kind not in ROW_SUMS:
        raise NotImplementedError(f"tables {names}: {type(fused).__name__} is not stepped over column-wise shards; "
                                  f"shard these tables table-wise or row-wise")
    for f in dataclasses.fields(fused):
        value = getattr(fused, f.name)
        if f.name not in _STEPPED_FIELDS and f.default is not dataclasses.MISSING and value != f.default:
            raise NotImplementedError(f"tables {names}: {type(fused).__name__}'s {f.name}={value!r} "
                                      f"is not implemented for column-wise shards; shard these tables table-wise "
                                      f"or row-wise")


class _Block(NamedTuple):
    """One step of one block (a local table of the exact collection) on the touched rows."""

    index: int                   # the local table
    w: torch.Tensor              # [U, cols] fp32 rows
    g: torch.Tensor              # [U, cols] fp32 summed gradients
    s1: Optional[torch.Tensor]   # the rows' state ([U] or [U, cols] fp32), or None
    s2: Optional[torch.Tensor]
    partial: torch.Tensor        # [U, k] the block's part of the row sums
    carried: Optional[torch.Tensor]


class _Work(NamedTuple):
    """One step's work on this rank's blocks of one exact table."""

    rows: torch.Tensor           # [U] int64 the touched rows, sorted
    blocks: List[_Block]         # the blocks held here, in block order


class ExactColumns:
    """Steps this rank's blocks of the exact tables of ``layout`` (held by ``collection``, a
    local collection with ``fused``'s state, or None) inside the backward.

    ``attach(output, kjt, weights)`` returns the collection's output with the step joined to
    its backward; ``kjt``: what it looked up (every rank's bags of its keys, its exact local
    keys in ``layout``'s order). ``pooled``: a bag collection, whose output is ``[W*B, D]``
    (each key's pooled columns side by side); else an unpooled one, whose output is flat: each
    key's ``[n_k, cols]`` rows (one per id), key after key."""

    def __init__(self, layout: ShardLayout, rank: int, collection, fused: FusedOptimizer, group,
                 device: torch.device, pooled: bool = True) -> None:
        check_exact(fused, layout)
        self._layout, self._rank, self._collection, self._group = layout, rank, collection, group
        self._device, self._pooled = device, pooled
        self._kind, self._sums = fused.kind, ROW_SUMS[fused.kind]
        self._fused = fused
        self._shards = layout.exact_shards(rank)
        # per local key: its columns, and (pooled) its first column in the collection's output
        self._cols: Dict[str, int] = {}
        self._dtypes: Dict[str, torch.dtype] = {}
        self._columns: Dict[str, int] = {}
        at = 0
        for s in self._shards:
            for f in layout.configs[s.table].feature_names:
                self._cols[s.local_feature(f)] = s.cols
                self._dtypes[s.local_feature(f)] = layout.configs[s.table].data_type.to_torch()
                self._columns[s.local_feature(f)] = at
                at += s.cols
        self.num_keys = len(self._columns)
        # every exact table's blocks (an empty one holds nothing), in block order
        self._blocks_of = {t: [s for s in layout.table_shards[t] if s.rows > 0 and s.cols > 0]
                           for t in layout.exact_tables}
        # every rank decides alike whether the all-to-all runs: some table has blocks on two ranks
        self._exchanges = any(len({s.rank for s in blocks}) > 1 for blocks in self._blocks_of.values())
        self._world = dist.get_world_size(group) if self._exchanges else 1

    def attach(self, pooled: torch.Tensor, kjt, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """``pooled``: the exact collection's output (see the class docstring), looked up
        without autograd (the step writes the rows the lookup read; the per-id weights'
        gradient is made here, from the rows before the step); ``weights``: the rank's whole
        local KJT's per-id weights, whose first ids are ``kjt``'s (None for an unpooled one)."""
        if not torch.is_grad_enabled():
            return pooled
        pooled = pooled.detach().requires_grad_()  # the node must run on every rank (see the module docstring)
        tied = weights if weights is not None and weights.requires_grad else pooled.new_empty(0)
        return _ExactStep.apply(pooled, tied, self, kjt)

    # --- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, grad: torch.Tensor, kjt, weights_grad: Optional[torch.Tensor] = None) -> None:
        """One step of every exact block on this rank, from the output's gradient;
        ``weights_grad`` (``[N]`` fp32, N >= ``kjt``'s ids), when given, takes the gradient of
        ``kjt``'s per-id weights (the rows as they were before the step)."""
        work: Dict[int, _Work] = {}
        hparams = None
        if self._collection is not None:
            state = self._collection.fused_optimizer_state
            for name, buffer in state.named_buffers():
                if name.endswith("_step"):
                    buffer.add_(1)
            hparams = state.hparams.tolist()
            work = self._partials(self._key_grads(grad, kjt, state.hparams), kjt, hparams,
                                  None if weights_grad is None else (grad.float(), weights_grad))
        sums = self._exchange(work)
        for t, w in work.items():
            dim = self._layout.configs[t].embedding_dim
            for b in w.blocks:
                views = state_views(self._collection, b.index, self._fused)
                finish_rows(self._kind, hparams, int(views["step"]), dim, b.w, b.g, b.s1, b.s2, sums[t], b.carried)
                self._write_back(b.index, w.rows, b, views)

    def _partials(self, key_grads: Dict[str, torch.Tensor], kjt, hparams, for_weights) -> Dict[int, "_Work"]:
        """Per exact table held here: its touched rows, each block's summed gradients, state and
        partial row sums. ``key_grads``: see :meth:`_key_grads`; ``for_weights``: None, or the
        unclipped output gradient and the per-id weights' gradient to fill."""
        device = self._device
        keys, starts = kjt.keys(), kjt.offset_per_key()
        stride = kjt.stride()
        lengths = kjt.lengths().reshape(len(keys), stride)
        values, psw = kjt.values(), kjt.weights_or_none()
        key_index = {k: j for j, k in enumerate(keys)}
        by_table: Dict[int, List[Tuple[int, Shard]]] = {}
        for i, s in enumerate(self._shards):
            by_table.setdefault(s.table, []).append((i, s))
        out: Dict[int, _Work] = {}
        for t, held in by_table.items():
            config = self._layout.configs[t]
            mean = getattr(config, "pooling", PoolingType.SUM) == PoolingType.MEAN
            # the table's ids, feature after feature, and each one's row among the features'
            # gradient rows (the same for every block): pooled, its bag; unpooled, its own row.
            # MEAN's 1/length per bag
            ids, bags, weights, keys_of, means = [], [], [], [], []
            first = held[0][1]
            base = 0
            for f in config.feature_names:
                j = key_index[first.local_feature(f)]
                lo, hi = starts[j], starts[j + 1]
                if self._pooled:
                    n = lengths[j].long()
                    bag = repeat_counts(torch.arange(stride, device=device), n, output_size=hi - lo)
                    means.append((1.0 / n.clamp(min=1).to(torch.float32)).unsqueeze(1) if mean else None)
                else:
                    bag = torch.arange(hi - lo, device=device)
                    means.append(None)
                ids.append(values[lo:hi].long())
                bags.append(bag + base)
                base += key_grads[first.local_feature(f)].shape[0]
                weights.append(None if psw is None else psw[lo:hi].float())
                keys_of.append(f)
            # sorted stably into runs of rows and summed by one embedding_bag over the runs, as
            # the unsharded step (ops/fused_torch.py) sums them: the same sums, bit for bit
            sorted_ids, order = torch.sort(torch.cat(ids), stable=True)
            rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
            run_offsets = F.pad(counts.cumsum(0), (1, 0))
            inverse = torch.empty_like(order)
            inverse[order] = repeat_counts(torch.arange(rows.shape[0], device=device), counts)
            sorted_bags = torch.cat(bags)[order]
            sorted_weights = None if psw is None else torch.cat(weights)[order]
            blocks = []
            for i, s in held:
                weight = self._collection.table_weight(i)
                bag_grads = []
                for f, per_bag in zip(keys_of, means):
                    columns = key_grads[s.local_feature(f)]
                    bag_grads.append(columns * per_bag if per_bag is not None else columns)
                g = F.embedding_bag(sorted_bags, torch.cat(bag_grads), run_offsets, mode="sum",
                                    include_last_offset=True, per_sample_weights=sorted_weights) \
                    if rows.shape[0] else torch.zeros(0, s.cols, device=device)  # [U, cols]
                views = state_views(self._collection, i, self._fused)
                w = weight.index_select(0, rows).float()
                if for_weights is not None:
                    self._weights_grad(s, keys_of, bags, means, inverse, w, kjt, stride, for_weights)
                s1, s2 = [views[name].index_select(0, rows).float() for name, _ in self._fused.state] + \
                    [None] * (2 - len(self._fused.state))
                partial, carried = row_partials(self._kind, hparams, int(views["step"]), w, g, s1, s2)
                blocks.append(_Block(i, w, g, s1, s2, partial, carried))
            out[t] = _Work(rows, blocks)
        return out

    def _key_grads(self, grad: torch.Tensor, kjt, state_hparams: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per local key, its fp32 gradient rows as the fused step reads them (clipped where the
        optimizer clips): pooled, its ``[W*B, cols]`` columns of the output gradient; unpooled,
        its ids' ``[n_k, cols]`` rows of the flat one, clipped in the table's dtype (their
        dtype in one module's step, where the bound is rounded to it)."""
        if self._pooled:
            grad = clipped_grad(grad, state_hparams).float()
            return {key: grad[:, c:c + self._cols[key]] for key, c in self._columns.items()}
        out, at = {}, 0
        for key, n in zip(kjt.keys(), kjt.length_per_key()):
            cols, dtype = self._cols[key], self._dtypes[key]
            rows = grad.narrow(0, at, n * cols).view(n, cols)
            out[key] = clipped_grad(rows.to(dtype), state_hparams).float()
            at += n * cols
        return out

    def _weights_grad(self, shard: Shard, features, bags, means, inverse, w, kjt, stride: int, for_weights) -> None:
        """The gradient of the per-id weights of ``shard``'s keys: each id's row (``w``, before
        the step) dotted with its bag's output gradient (MEAN: over the bag's length)."""
        grad, out = for_weights
        starts, key_index = kjt.offset_per_key(), {k: j for j, k in enumerate(kjt.keys())}
        at = 0
        for k, (f, bag, per_bag) in enumerate(zip(features, bags, means)):
            j = key_index[shard.local_feature(f)]
            lo, hi = starts[j], starts[j + 1]
            c = self._columns[shard.local_feature(f)]
            rows = w.index_select(0, inverse[at:at + hi - lo])
            bag = bag - k * stride  # the feature's own bags
            value = (grad[:, c:c + shard.cols].index_select(0, bag) * rows).sum(1)
            out[lo:hi] = value if per_bag is None else value * per_bag.squeeze(1).index_select(0, bag)
            at += hi - lo

    def _exchange(self, work: Dict[int, "_Work"]) -> Dict[int, torch.Tensor]:
        """Every exact table held here: its ``[U, k]`` row sums, every block's parts added in
        block order (one all-to-all with the other holders)."""
        rank = self._rank
        counts = {t: w.rows.shape[0] for t, w in work.items()}
        received: Dict[Tuple[int, int], List[torch.Tensor]] = {}
        if self._exchanges:
            sends, send_splits, recv_splits, expected = [], [], [], []
            for r in range(self._world):
                sent = received_size = 0
                for t in sorted(work):
                    theirs = [s for s in self._blocks_of[t] if s.rank == r]
                    if r == rank or not theirs:
                        continue
                    for b in work[t].blocks:
                        sends.append(b.partial.reshape(-1))
                        sent += b.partial.numel()
                    expected.append((r, t, len(theirs)))
                    received_size += len(theirs) * counts[t] * self._sums
                send_splits.append(sent)
                recv_splits.append(received_size)
            flat = torch.cat(sends) if sends else torch.zeros(0, device=self._device)
            incoming = flat.new_empty(sum(recv_splits))
            dist.all_to_all_single(incoming, flat.contiguous(), recv_splits, send_splits, group=self._group)
            at = 0
            for r, t, n in expected:
                size = counts[t] * self._sums
                received[(r, t)] = [incoming[at + b * size:at + (b + 1) * size].view(counts[t], self._sums)
                                    for b in range(n)]
                at += n * size
        sums = {}
        for t, w in work.items():
            mine = iter(b.partial for b in w.blocks)
            theirs = {r: iter(parts) for (r, table), parts in received.items() if table == t}
            total = None
            for s in self._blocks_of[t]:
                part = next(mine) if s.rank == rank else next(theirs[s.rank])
                total = part.clone() if total is None else total.add_(part)
            sums[t] = total
        return sums

    def _write_back(self, i: int, rows: torch.Tensor, block: _Block, views) -> None:
        weight = self._collection.table_weight(i)
        weight.index_copy_(0, rows, block.w.to(weight.dtype))
        for (name, _), value in zip(self._fused.state, (block.s1, block.s2)):
            views[name].index_copy_(0, rows, value.to(views[name].dtype))


class _ExactStep(torch.autograd.Function):
    """The exact collection's output as it is; its backward steps the exact blocks
    (``ExactColumns.step``) and gives ``tied`` (the per-id weights, or an empty stand-in) their
    gradient (zero where no exact block reads them), so that their way back starts after the
    step on every rank."""

    @staticmethod
    def forward(ctx, pooled: torch.Tensor, tied: torch.Tensor, owner: ExactColumns, kjt):
        ctx.owner, ctx.kjt = owner, kjt
        ctx.tied = (tied.shape, tied.dtype, tied.device)
        return pooled.view_as(pooled)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.tied
        weights_grad = torch.zeros(shape, dtype=torch.float32, device=device)
        ctx.owner.step(grad, ctx.kjt, weights_grad if ctx.needs_input_grad[1] else None)
        return None, weights_grad.to(dtype), None, None
