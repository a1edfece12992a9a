"""``EmbeddingBagCollectionSharder`` and the ``ShardedEmbeddingBagCollection`` it makes.

One step, on every rank: the input dist sends each rank the bags its shards serve
(``input_dist.py``); this rank's local collection, every local shard of a dtype in one flat
parameter, pools them with one op call per dtype; the output dist brings each rank its own
bags' rows back (``comm.OutputDist``) and the awaitable lays them out in the unsharded
module's column order. Tables split into column blocks under a fused optimizer that reads
whole rows are looked up by a second local collection and stepped exactly in the backward
(``exact_columns.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from jaggedrec.modules.embedding_modules import EmbeddingBagCollection
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor, as_keyed_jagged_tensor
from jaggedrec.optim import FusedOptimizer
from jaggedrec.distributed.comm import Pending, output_dist, tie_backward
from jaggedrec.distributed.exact_columns import ExactColumns
from jaggedrec.distributed.input_dist import InputDist
from jaggedrec.distributed.shard_layout import EXCHANGE, REDUCE, REPLICA, ShardLayout
from jaggedrec.distributed.shards import CollectionSharder, ShardedCollection, build_local_collection, check_env
from jaggedrec.distributed.types import Awaitable, EmbeddingModuleShardingPlan, LazyAwaitable, ShardingEnv


class EmbeddingBagCollectionAwaitable(LazyAwaitable[KeyedTensor]):
    """The output of a sharded forward: ``wait()`` (or any use as a ``KeyedTensor``) completes
    the output dist and returns this rank's ``[B, sum(dims)]`` KeyedTensor."""

    def __init__(self, assemble: Callable[..., KeyedTensor], pending: Pending, received: torch.Tensor,
                 reduced: torch.Tensor, own: torch.Tensor, batch_size: int, own_lengths: Dict[str, torch.Tensor]):
        super().__init__()
        self._assemble, self._pending = assemble, pending
        self._parts = (received, reduced, own)
        self._batch_size, self._own_lengths = batch_size, own_lengths

    def _wait_impl(self) -> KeyedTensor:
        self._pending.wait()
        return self._assemble(*self._parts, self._batch_size, self._own_lengths)


class ShardedEmbeddingBagCollection(ShardedCollection):
    """An ``EmbeddingBagCollection`` sharded over the ranks of ``env`` by ``plan``.

    ``forward(kjt)`` takes this rank's KJT (``B`` bags per feature, the same ``B`` on every rank
    in a step; jaggedrec's or TorchRec's, whose tensors it uses as they are) and returns an
    ``EmbeddingBagCollectionAwaitable`` of the ``[B, sum(dims)]`` KeyedTensor that the
    unsharded module gives for these bags. Every rank must call it in the same steps.
    Attributes TorchRec's tutorial prints: ``_input_dists``, ``_lookups`` (the local
    collection) and ``_output_dists``.
    """

    def __init__(self, module: EmbeddingBagCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: Optional[torch.device] = None, fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        super().__init__()
        device = check_env(type(self).__name__, env, device, module)
        self._env, self._group, self._plan = env, env.process_group, plan
        rank = env.rank
        fused = fused_optimizer if fused_optimizer is not None else module.fused_optimizer
        self._fused = fused
        whole_rows = fused is not None and fused.needs_whole_rows
        self._layout = layout = ShardLayout(module.embedding_bag_configs(), plan, env.world_size, whole_rows)
        local = build_local_collection(module, layout, rank, device, fused, layout.other_shards(rank),
                                       exact_columns=True, is_weighted=module.is_weighted())
        self._lookups = nn.ModuleList([local] if local is not None else [])
        # the tables split into column blocks under fused: a collection of their own, stepped
        # by self._exact in the backward (see exact_columns.py)
        self._exact_lookup = build_local_collection(module, layout, rank, device, fused, layout.exact_shards(rank),
                                                    exact_columns=True, is_weighted=module.is_weighted())
        if self._exact_lookup is not None:  # looked up only: ExactColumns steps it
            self._exact_lookup.fused_optimizer_state.backward_trigger.requires_grad_(False)
        self._exact = (ExactColumns(layout, rank, self._exact_lookup, fused, self._group, device)
                       if layout.exact_tables else None)
        self._input_dists = nn.ModuleList([InputDist(layout, rank, self._group, module.feature_spec,
                                                    module.is_weighted())])
        self._output_dists = nn.ModuleList([_OutputDistModule(layout, rank)])
        self._embedding_names = list(module.layout.embedding_names)
        self._lengths_per_embedding = list(module.layout.embedding_dims())
        self._exchange_widths = [layout.exchange_width(r) for r in range(env.world_size)]
        self._column_plan = _column_plan(layout, device)
        self._local_columns = _local_columns(layout, rank)
        self._device = device
        self._weights_grad = False
        self._init_state_dict(layout, rank, self.local_collection(), fused, self._group, device, self._exact_lookup)

    # --- forward -------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor) -> EmbeddingBagCollectionAwaitable:
        taken = self._take_input(as_keyed_jagged_tensor(features))
        if isinstance(taken, Awaitable):  # a semi-sync pipeline's lookup, done a step ahead
            return taken
        local_kjt, b, own_lengths, _ = taken.wait(self._weights_grad)
        world = self._env.world_size
        weights = local_kjt.weights_or_none()
        if self._exact is not None:  # the exact tables' keys come first (see ShardLayout)
            exact_kjt, local_kjt = local_kjt.split([self._exact.num_keys, len(local_kjt.keys()) - self._exact.num_keys])
        if self._lookups:
            pooled = self._lookups[0](local_kjt).values()
        else:
            pooled = torch.zeros(world * b, 0, device=self._device)
        exchange_rows, reduce_rows, replica_rows = self._split_local(pooled, world * b)
        if self._exact is not None:
            with torch.no_grad():  # the exact step writes the rows read here (see ExactColumns.attach)
                exact_rows = (self._exact_lookup(exact_kjt).values() if self._exact_lookup is not None
                              else torch.zeros(world * b, 0, device=self._device))
            exchange_rows = torch.cat([self._exact.attach(exact_rows, exact_kjt, weights), exchange_rows], 1)
        if weights is not None and weights.requires_grad:
            exchange_rows = tie_backward(exchange_rows, weights)
        pending = Pending(taken.check)
        received, reduced, own = output_dist(exchange_rows, reduce_rows, replica_rows, self._exchange_widths,
                                                 b, self._group, pending)
        return EmbeddingBagCollectionAwaitable(self._assemble, pending, received, reduced, own, b, own_lengths)

    def _split_local(self, pooled: torch.Tensor, rows: int):
        """The local ``[W*B, D_local]`` output cut into the output dist's three buffers; the
        reduce buffer has every row-wise table's columns in one order on every rank, zero
        where this rank holds no rows of the table.

        One ``split`` into contiguous blocks (the local order is exchange, reduce, replica,
        and the reduce blocks come in the buffer's order): its backward concatenates the
        gradients, where a ``narrow`` per block would zero-fill a whole ``[W*B, D_local]``
        gradient for each."""
        exchange_width, reduce_parts, replica_width = self._local_columns
        held = [width for start, width in reduce_parts if start >= 0]
        exchange_rows, held_rows, replica_rows = torch.split(pooled, [exchange_width, sum(held), replica_width], 1)
        if len(held) == len(reduce_parts):
            return exchange_rows, held_rows, replica_rows
        pieces = iter(torch.split(held_rows, held, 1))
        parts = [next(pieces) if start >= 0 else pooled.new_zeros(rows, width) for start, width in reduce_parts]
        return exchange_rows, torch.cat(parts, 1), replica_rows

    def _assemble(self, received: torch.Tensor, reduced: torch.Tensor, own: torch.Tensor, b: int,
                  own_lengths: Dict[str, torch.Tensor]) -> KeyedTensor:
        """The received blocks side by side, moved to their output columns; MEAN row-split
        features divided by this rank's bag lengths."""
        widths = self._exchange_widths
        blocks = [c.view(b, w) for c, w in zip(torch.split(received, [b * w for w in widths]), widths)]
        side_by_side = torch.cat(blocks + [reduced, own], 1)
        columns, placed, mean_features = self._column_plan
        if placed is not None:  # each output column has one source: a permutation of blocks
            out = _PlaceColumns.apply(side_by_side, *placed)
        else:  # TABLE_ROW_WISE partial sums land on the same columns and add up
            out = side_by_side.new_zeros(b, self._layout.output_width).index_add(1, columns, side_by_side)
        if mean_features:
            scale = out.new_ones(b, self._layout.output_width)
            for key, start, width in mean_features:
                lens = own_lengths[key].to(out.device).clamp(min=1).to(out.dtype)
                scale[:, start:start + width] = (1.0 / lens).unsqueeze(1)
            out = out * scale
        return KeyedTensor(self._embedding_names, self._lengths_per_embedding, out)

    def embedding_bag_configs(self):
        return list(self._layout.configs)

    def set_weights_require_grad(self, flag: bool) -> None:
        """Whether the per-id weights this module is given get their gradient back through the
        input dist (a collective in the backward, so it must be set alike on every rank: a
        sharded ``FeatureProcessedEmbeddingBagCollection`` sets it from its processors'
        ``requires_grad``). Off by default: the weights are taken as constants."""
        self._weights_grad = bool(flag)


class _OutputDistModule(nn.Module):
    """What the output dist does on this rank, for printing (the work is in ``comm.OutputDist``)."""

    def __init__(self, layout: ShardLayout, rank: int) -> None:
        super().__init__()
        kinds = {REDUCE: "reduce-scatter", EXCHANGE: "all-to-all", REPLICA: "local rows"}
        self._summary = {layout.configs[t].name: kinds[layout.table_kind(t)] for t in range(len(layout.configs))}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {how}" for name, how in self._summary.items())


class EmbeddingBagCollectionSharder(CollectionSharder):
    """Shards ``EmbeddingBagCollection``s into ``ShardedEmbeddingBagCollection``s; ``fused_params``
    (TorchRec's form, see ``fused_params.py``) gives the shards a fused optimizer, replacing the
    module's own."""

    module_type = EmbeddingBagCollection
    sharded_type = ShardedEmbeddingBagCollection
    exact_columns = True


def _local_columns(layout: ShardLayout, rank: int):
    """Where this rank's local output (its exact tables' apart) holds the output dist's
    columns: the exchange width, ``(start or -1, width)`` per reduce block, and the replica width."""
    start, exchange, replica, at = {}, 0, 0, 0
    for _, key, s in layout.local_features[rank]:
        if s.table in layout.exact_tables:  # looked up apart (see ShardedEmbeddingBagCollection.forward)
            continue
        start[(s.table, key)] = at
        at += s.cols
        if s.kind == EXCHANGE:
            exchange += s.cols
        elif s.kind == REPLICA:
            replica += s.cols
    reduce_parts = [(start.get((t, f), -1), dim) for t, f, dim in layout.reduce_blocks]
    return exchange, reduce_parts, replica


def _column_plan(layout: ShardLayout, device: torch.device):
    """``(output column of each received column [C], when each output column has one source
    the permutation of blocks of ``g`` columns that places them (``(order, inverse, g)``, else
    None), [(key, first column, width)] of the MEAN row-split features)``; the index tensors
    on ``device``, made once rather than copied there every step."""
    targets = []
    for block in layout.received_columns():
        targets.extend(range(block.target, block.target + block.width))
    columns = torch.tensor(targets, dtype=torch.int64)
    placed = None
    if len(set(targets)) == len(targets) == layout.output_width:
        # runs of received columns that land side by side; blocks of g columns tile them all
        edges = [0, len(targets)] + [i for i in range(1, len(targets)) if targets[i] != targets[i - 1] + 1]
        edges += [targets[i] for i in edges if i < len(targets)]
        g = functools.reduce(math.gcd, edges)
        blocks = columns[::g] // g
        placed = (torch.argsort(blocks).to(device), blocks.to(device), g)
    mean_features = []
    starts, at = {}, 0
    for t, f in layout.output_features:
        starts[(t, f)] = at
        at += layout.configs[t].embedding_dim
    for i in layout.mean_row_split:
        t, f = layout.output_features[i]
        mean_features.append((f, starts[(t, f)], layout.configs[t].embedding_dim))
    return columns.to(device), placed, mean_features


class _PlaceColumns(torch.autograd.Function):
    """``[B, C]`` received columns -> ``[B, C]`` in output order, moved in blocks of ``g``
    columns (the widest that tiles every run; a table's dim, often): ``placed[j]`` is the
    received block of output block ``j`` and ``columns`` the inverse. The backward is the
    inverse gather, where autograd's would scatter-add into a zero-filled gradient."""

    @staticmethod
    def forward(ctx, side_by_side: torch.Tensor, placed: torch.Tensor, columns: torch.Tensor, g: int):
        ctx.columns, ctx.g = columns, g
        b, c = side_by_side.shape
        return side_by_side.reshape(b, c // g, g).index_select(1, placed).view(b, c)

    @staticmethod
    def backward(ctx, grad):
        b, c = grad.shape
        return grad.reshape(b, c // ctx.g, ctx.g).index_select(1, ctx.columns).view(b, c), None, None, None
