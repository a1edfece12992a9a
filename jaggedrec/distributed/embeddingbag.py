"""``EmbeddingBagCollectionSharder`` and the ``ShardedEmbeddingBagCollection`` it makes.

One step, on every rank: the input dist sends each rank the bags its shards serve
(``input_dist.py``); this rank's local collection, every local shard of a dtype in one flat
parameter, pools them with one op call per dtype; the output dist brings each rank its own
bags' rows back (``comm.OutputDist``) and the awaitable lays them out in the unsharded
module's column order.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..embedding_modules import EmbeddingBagCollection
from ..keyed_jagged_tensor import KeyedJaggedTensor
from ..keyed_tensor import KeyedTensor
from ..optim import FusedOptimizer, RowWiseAdagrad
from .checkpoint import ShardedState
from .comm import OutputDist, Pending
from .fused_params import fused_optimizer_from_params, fused_optimizer_in_backward
from .input_dist import InputDist
from .shard_layout import EXCHANGE, REDUCE, REPLICA, ShardLayout
from .types import (EmbeddingModuleShardingPlan, LazyAwaitable, ShardingEnv, ShardingType)

# rows per block of the deterministic initialisation of a module built on meta (see _init_shard)
_INIT_BLOCK_ROWS = 4096


class EmbeddingBagCollectionAwaitable(LazyAwaitable[KeyedTensor]):
    """The output of a sharded forward: ``wait()`` (or any use as a ``KeyedTensor``) completes
    the output dist and returns this rank's ``[B, sum(dims)]`` KeyedTensor."""

    def __init__(self, module: "ShardedEmbeddingBagCollection", pending: Pending, received: torch.Tensor,
                 reduced: torch.Tensor, own: torch.Tensor, batch_size: int, own_lengths: Dict[str, torch.Tensor]):
        super().__init__()
        self._module, self._pending = module, pending
        self._parts = (received, reduced, own)
        self._batch_size, self._own_lengths = batch_size, own_lengths

    def _wait_impl(self) -> KeyedTensor:
        self._pending.wait()
        return self._module._assemble(*self._parts, self._batch_size, self._own_lengths)


class ShardedEmbeddingBagCollection(nn.Module):
    """An ``EmbeddingBagCollection`` sharded over the ranks of ``env`` by ``plan``.

    ``forward(kjt)`` takes this rank's KJT (``B`` bags per feature, the same ``B`` on every rank
    in a step) and returns an ``EmbeddingBagCollectionAwaitable`` of the ``[B, sum(dims)]``
    KeyedTensor that the unsharded module gives for these bags. Every rank must call it in
    the same steps. Attributes TorchRec's tutorial prints: ``_input_dists``, ``_lookups`` (the
    local collection) and ``_output_dists``.
    """

    def __init__(self, module: EmbeddingBagCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: Optional[torch.device] = None, fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        super().__init__()
        if env.process_group is None and env.world_size > 1:
            raise ValueError("ShardedEmbeddingBagCollection: sharding over several ranks needs a process group "
                             "(ShardingEnv.from_process_group)")
        self._env = env
        self._group = env.process_group
        self._plan = plan
        configs = module.embedding_bag_configs()
        self._layout = layout = ShardLayout(configs, plan, env.world_size)
        rank = env.rank
        fused = fused_optimizer if fused_optimizer is not None else module.fused_optimizer
        _check_fused(layout, fused)
        self._fused = fused
        device = torch.device(device) if device is not None else module.device
        if device.type == "meta":
            raise ValueError("ShardedEmbeddingBagCollection: give the device the shards live on (the module is on meta)")
        local_configs = layout.local_configs(rank)
        lookups = []
        if local_configs:
            local = EmbeddingBagCollection(local_configs, is_weighted=module.is_weighted(), device=device,
                                           backend=module._backend, sparse=module._sparse, validate=False,
                                           bounds_check=module._bounds_check, deterministic=module._deterministic,
                                           fused_optimizer=fused)
            _copy_shards(local, module, layout, rank)
            lookups.append(local)
        self._lookups = nn.ModuleList(lookups)
        self._input_dists = nn.ModuleList([InputDist(layout, rank, self._group, module._spec, module.is_weighted())])
        self._output_dists = nn.ModuleList([_OutputDistModule(layout, rank)])
        self._embedding_names = list(module._embedding_names)
        self._length_per_embedding = list(module._length_per_embedding)
        self._exchange_widths = [layout.exchange_width(r) for r in range(env.world_size)]
        self._column_plan = _column_plan(layout)
        self._local_columns = _local_columns(layout, rank)
        self._device = device
        self._state = ShardedState(layout, rank, self.local_collection(), fused, self._group, device)
        self.register_load_state_dict_pre_hook(_load_sharded_state)

    # --- forward -------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor) -> EmbeddingBagCollectionAwaitable:
        local_kjt, b, own_lengths = self._input_dists[0](features)
        world = self._env.world_size
        if self._lookups:
            pooled = self._lookups[0](local_kjt).values()
        else:
            pooled = torch.zeros(world * b, 0, device=self._device)
        exchange_rows, reduce_rows, replica_rows = self._split_local(pooled, world * b)
        pending = Pending()
        received, reduced, own = OutputDist.apply(exchange_rows, reduce_rows, replica_rows, self._exchange_widths,
                                                  b, self._group, pending)
        return EmbeddingBagCollectionAwaitable(self, pending, received, reduced, own, b, own_lengths)

    def _split_local(self, pooled: torch.Tensor, rows: int):
        """The local ``[W*B, D_local]`` output cut into the output dist's three buffers; the
        reduce buffer has every row-wise table's columns in one order on every rank, zero
        where this rank holds no rows of the table."""
        exchange_width, reduce_parts, replica_width = self._local_columns
        exchange_rows = pooled.narrow(1, 0, exchange_width)
        parts = [pooled.narrow(1, start, width) if start >= 0 else pooled.new_zeros(rows, width)
                 for start, width in reduce_parts]
        reduce_rows = torch.cat(parts, 1) if parts else pooled.new_zeros(rows, 0)
        replica_rows = pooled.narrow(1, pooled.shape[1] - replica_width, replica_width)
        return exchange_rows, reduce_rows, replica_rows

    def _assemble(self, received: torch.Tensor, reduced: torch.Tensor, own: torch.Tensor, b: int,
                  own_lengths: Dict[str, torch.Tensor]) -> KeyedTensor:
        """The received blocks side by side, moved to their output columns; MEAN row-split
        features divided by this rank's bag lengths."""
        widths = self._exchange_widths
        blocks = [c.view(b, w) for c, w in zip(torch.split(received, [b * w for w in widths]), widths)]
        side_by_side = torch.cat(blocks + [reduced, own], 1)
        columns, unique, mean_features = self._column_plan
        columns = columns.to(side_by_side.device)
        if unique:
            out = side_by_side.index_select(1, columns)
        else:  # TABLE_ROW_WISE partial sums land on the same columns and add up
            out = side_by_side.new_zeros(b, self._layout.output_width).index_add(1, columns, side_by_side)
        if mean_features:
            scale = out.new_ones(b, self._layout.output_width)
            for key, start, width in mean_features:
                lens = own_lengths[key].to(out.device).clamp(min=1).to(out.dtype)
                scale[:, start:start + width] = (1.0 / lens).unsqueeze(1)
            out = out * scale
        return KeyedTensor(self._embedding_names, self._length_per_embedding, out)

    # --- what the module holds ---------------------------------------------------------------
    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        """The fused optimizer the shards step in the backward (None: dense or sparse gradients)."""
        return self._fused

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """TorchRec's keys (``embedding_bags.<table>.weight``, and the fused optimizer's state),
        as ``ShardedTensor``s of this rank's shards, plain for replicated tables: see
        ``checkpoint.py``. Save and load it with ``torch.distributed.checkpoint``, which
        reshards across plans and world sizes."""
        destination = destination if destination is not None else OrderedDict()
        for key, value in self._state.state_dict().items():
            destination[prefix + key] = value
        return destination

    def local_collection(self) -> Optional[EmbeddingBagCollection]:
        """This rank's shards as one collection (None when it holds none)."""
        return self._lookups[0] if self._lookups else None

    def embedding_bag_configs(self):
        return list(self._layout.configs)

    def extra_repr(self) -> str:
        return f"world_size={self._env.world_size}, rank={self._env.rank}"


def _load_sharded_state(module: ShardedEmbeddingBagCollection, state_dict, prefix, local_metadata, strict,
                        missing_keys, unexpected_keys, error_msgs) -> None:
    """Take this module's keys (see ``state_dict``); the submodules then load their own
    tensors onto themselves."""
    module._state.load(state_dict, prefix, missing_keys, error_msgs)
    for key, value in nn.Module.state_dict(module, prefix=prefix).items():
        state_dict.setdefault(key, value)


class _OutputDistModule(nn.Module):
    """What the output dist does on this rank, for printing (the work is in ``comm.OutputDist``)."""

    def __init__(self, layout: ShardLayout, rank: int) -> None:
        super().__init__()
        kinds = {REDUCE: "reduce-scatter", EXCHANGE: "all-to-all", REPLICA: "local rows"}
        self._summary = {layout.configs[t].name: kinds[layout.table_kind(t)] for t in range(len(layout.configs))}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {how}" for name, how in self._summary.items())


class EmbeddingBagCollectionSharder:
    """Shards ``EmbeddingBagCollection``s; ``fused_params`` (TorchRec's form, see
    ``fused_params.py``) gives the shards a fused optimizer, replacing the module's own."""

    module_type = EmbeddingBagCollection

    def __init__(self, fused_params: Optional[dict] = None) -> None:
        self.fused_params = dict(fused_params) if fused_params else {}
        self._fused = fused_optimizer_from_params(self.fused_params)

    def shard(self, module: EmbeddingBagCollection, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None
              ) -> ShardedEmbeddingBagCollection:
        if not isinstance(module, EmbeddingBagCollection):
            raise TypeError(f"EmbeddingBagCollectionSharder shards jaggedrec.EmbeddingBagCollection, got "
                            f"{type(module).__name__}")
        return ShardedEmbeddingBagCollection(module, params, env, device, self.shard_optimizer(module))

    def shard_optimizer(self, module: nn.Module) -> Optional[FusedOptimizer]:
        """The fused optimizer ``module``'s shards step with: ``fused_params``'s, else an
        in-backward optimizer attached to its weights, else the module's own (None: not fused)."""
        return self._fused or fused_optimizer_in_backward(module) or module.fused_optimizer

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [t.value for t in ShardingType]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return ["fused"] if self._fused is not None else ["dense", "fused"]

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._fused


def _check_fused(layout: ShardLayout, fused: Optional[FusedOptimizer]) -> None:
    if isinstance(fused, RowWiseAdagrad):
        split = [layout.configs[t].name for t, shards in enumerate(layout.table_shards)
                 if len(shards) > 1 and not shards[0].row_split and shards[0].kind == EXCHANGE]
        if split:
            raise NotImplementedError(
                f"tables {split}: row-wise Adagrad keeps one state per row, the mean of the row's squared "
                f"gradient over all its columns, which column-wise shards cannot compute without another "
                f"collective inside the backward; shard these tables table-wise or row-wise")


def _local_columns(layout: ShardLayout, rank: int):
    """Where this rank's local output holds the output dist's columns: the exchange width,
    ``(start or -1, width)`` per reduce block, and the replica width."""
    start, exchange, replica, at = {}, 0, 0, 0
    for _, key, s in layout.local_features[rank]:
        start[(s.table, key)] = at
        at += s.cols
        if s.kind == EXCHANGE:
            exchange += s.cols
        elif s.kind == REPLICA:
            replica += s.cols
    reduce_parts = [(start.get((t, f), -1), dim) for t, f, dim in layout.reduce_blocks]
    return exchange, reduce_parts, replica


def _column_plan(layout: ShardLayout):
    """``(output column of each received column [C], whether each output column has one source,
    [(key, first column, width)] of the MEAN row-split features)``."""
    targets = []
    for block in layout.received_columns():
        targets.extend(range(block.target, block.target + block.width))
    columns = torch.tensor(targets, dtype=torch.int64)
    unique = len(set(targets)) == len(targets) == layout.output_width
    if unique:  # index_select takes, for each output column, the received column that lands there
        columns = torch.argsort(columns)
    mean_features = []
    starts, at = {}, 0
    for t, f in layout.output_features:
        starts[(t, f)] = at
        at += layout.configs[t].embedding_dim
    for i in layout.mean_row_split:
        t, f = layout.output_features[i]
        mean_features.append((f, starts[(t, f)], layout.configs[t].embedding_dim))
    return columns, unique, mean_features


@torch.no_grad()
def _copy_shards(local: EmbeddingBagCollection, module: EmbeddingBagCollection, layout: ShardLayout,
                 rank: int) -> None:
    """Each local table takes its block of the unsharded module's table, or, for a module on
    meta, the deterministic initialisation of ``_init_shard``."""
    for i, s in enumerate(layout.shards[rank]):
        target = local.table_weight(i)
        source = module.table_weight(s.table)
        if source.device.type == "meta":
            _init_shard(layout.configs[s.table], s, target)
        else:
            target.copy_(source[s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols])


def _init_shard(config, shard, target: torch.Tensor) -> None:
    """Initialise one shard as the whole table would be, whatever the plan: the table's rows
    are drawn in blocks of ``_INIT_BLOCK_ROWS``, each from a generator seeded by the table's name
    and the block's index, and the shard keeps its rows and columns of them. A config's
    ``init_fn`` is called on the shard's view instead."""
    if config.init_fn is not None:
        result = config.init_fn(target)
        if isinstance(result, torch.Tensor) and result.data_ptr() != target.data_ptr():
            target.copy_(result)
        return
    seed = zlib.crc32(config.name.encode())
    first, last = shard.row_offset, shard.row_offset + shard.rows
    for block in range(first // _INIT_BLOCK_ROWS, -(-last // _INIT_BLOCK_ROWS)):
        lo = block * _INIT_BLOCK_ROWS
        hi = min(lo + _INIT_BLOCK_ROWS, config.num_embeddings)
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.empty(hi - lo, config.embedding_dim).uniform_(config.weight_init_min, config.weight_init_max,
                                                                   generator=g)
        a, z = max(lo, first), min(hi, last)
        target[a - first:z - first] = rows[a - lo:z - lo, shard.col_offset:shard.col_offset + shard.cols]
