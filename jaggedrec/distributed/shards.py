"""What both sharded collections share: the sharder, how shards take their weights, and
which fused optimizers a layout can step exactly."""

from __future__ import annotations

import zlib
from typing import Dict, List, Optional

import torch
from torch import nn

from jaggedrec.optim import FusedOptimizer, RowWiseAdagrad
from jaggedrec.distributed.checkpoint import ShardedStateDict
from jaggedrec.distributed.fused_params import fused_optimizer_from_params, fused_optimizer_in_backward
from jaggedrec.distributed.shard_layout import EXCHANGE, Shard, ShardLayout
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ShardingEnv

# rows per block of the deterministic initialisation of a module built on meta (see init_shard)
INIT_BLOCK_ROWS = 4096


class ShardedCollection(ShardedStateDict, nn.Module):
    """What both sharded collections hold: ``_env``, ``_plan``, ``_fused``, ``_lookups``,
    ``_input_dists``, ``_device``.

    A train pipeline (``jaggedrec.distributed.train_pipeline``) attaches itself with
    ``set_input_source``: the forward then asks it first for the input dist it launched
    ahead for the KJT received (or, semi-synchronously, for the whole output), and
    distributes the KJT itself only when the pipeline has none."""

    _input_source = None  # the attached pipeline's hook (see set_input_source)

    @property
    def plan(self) -> EmbeddingModuleShardingPlan:
        return self._plan

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        """The fused optimizer the shards step in the backward (None: dense or sparse gradients)."""
        return self._fused

    def local_collection(self) -> Optional[nn.Module]:
        """This rank's shards as one collection (None when it holds none); the bag collection's
        shards of exact tables apart (see :meth:`exact_collection`)."""
        return self._lookups[0] if self._lookups else None

    def exact_collection(self) -> Optional[nn.Module]:
        """This rank's shards of the tables split into column blocks under a fused optimizer that
        reads whole rows, as one collection that only looks up (``exact_columns.py`` steps it;
        None when there are none)."""
        return getattr(self, "_exact_lookup", None)

    def extra_repr(self) -> str:
        return f"world_size={self._env.world_size}, rank={self._env.rank}"

    # --- train pipelines -----------------------------------------------------------------
    @property
    def process_group(self):
        return self._group

    @property
    def device(self) -> torch.device:
        return self._device

    def input_feature_names(self) -> List[str]:
        """The features ``forward`` needs in its KJT."""
        return self._input_dists[0].keys

    def start_input_dist(self, features, missing: str = ""):
        """Launch the input dist of ``features`` (a jaggedrec KJT, or None with ``missing``
        saying why: every rank then raises in the step); an ``input_dist.InFlight``."""
        return self._input_dists[0].start(features, self._device, missing)

    def set_input_source(self, source) -> None:
        """Attach a train pipeline's hook (None: detach). ``source.take(module, kjt)`` returns
        the ``InFlight`` input dist or the ``Awaitable`` output it has for ``kjt``, or None."""
        self._input_source = source

    def _take_input(self, features):
        """The pipeline's ``InFlight`` or ``Awaitable`` for ``features``, else a new input dist."""
        if self._input_source is not None:
            taken = self._input_source.take(self, features)
            if taken is not None:
                return taken
        return self._input_dists[0].start(features)


class CollectionSharder(ModuleSharder[nn.Module]):
    """Shards collections of type ``module_type`` into ``sharded_type``; ``fused_params``
    (TorchRec's form, see ``fused_params.py``) gives the shards a fused optimizer, replacing
    the module's own."""

    module_type: type = nn.Module
    sharded_type: type = nn.Module
    #: whether the sharded collection steps column-wise shards of a fused optimizer that reads
    #: whole rows (see check_fused); the planner keeps such tables whole in columns elsewhere
    exact_columns: bool = False

    def __init__(self, fused_params: Optional[dict] = None, qcomm_codecs_registry: Optional[dict] = None) -> None:
        super().__init__(qcomm_codecs_registry)
        self.fused_params = dict(fused_params) if fused_params else {}
        self._fused = fused_optimizer_from_params(self.fused_params)

    def shard(self, module: nn.Module, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> nn.Module:
        if not isinstance(module, self.module_type):
            raise TypeError(f"{type(self).__name__} shards jaggedrec.{self.module_type.__name__}, got "
                            f"{type(module).__name__}")
        return self.sharded_type(module, params, env, device, self.shard_optimizer(module))

    def shard_optimizer(self, module: nn.Module) -> Optional[FusedOptimizer]:
        """The fused optimizer ``module``'s shards step with: ``fused_params``'s, else an
        in-backward optimizer attached to its weights, else the module's own (None: not fused)."""
        return self._fused or fused_optimizer_in_backward(module) or module.fused_optimizer

    def shardable_parameters(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """Table name -> its ``[rows, dim]`` weight (a view of the collection's flat storage)."""
        configs = (module.embedding_bag_configs() if hasattr(module, "embedding_bag_configs")
                   else module.embedding_configs())
        return {c.name: module.table_weight(i) for i, c in enumerate(configs)}

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return ["fused"] if self._fused is not None else ["dense", "fused"]

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._fused


def check_fused(layout: ShardLayout, fused: Optional[FusedOptimizer], exact_columns: bool = False) -> None:
    """Refuse what a fused optimizer cannot step exactly under ``layout``: tables split into
    column blocks under an optimizer that steps rows by their sums, unless the collection
    combines the blocks' sums (``exact_columns``: both collections, see ``exact_columns.py``)."""
    if fused is not None and fused.needs_whole_rows and not exact_columns:
        split = [layout.configs[t].name for t, shards in enumerate(layout.table_shards)
                 if len(shards) > 1 and not shards[0].row_split and shards[0].kind == EXCHANGE]
        if split:
            what = ("row-wise Adagrad keeps one state per row, the mean of the row's squared gradient"
                    if isinstance(fused, RowWiseAdagrad) else
                    f"{type(fused).__name__} steps each row by sums (norms or a row-wise state)")
            raise NotImplementedError(
                f"tables {split}: {what} over all its columns, which this collection's column-wise shards do not "
                f"combine; shard these tables table-wise or row-wise")


@torch.no_grad()
def copy_shards(local: nn.Module, module: nn.Module, layout: ShardLayout, rank: int,
                shards: Optional[List[Shard]] = None) -> None:
    """Each local table of ``local`` (one per shard of ``shards``, default: the rank's) takes its
    block of ``module``'s table, or, for a module on meta, the deterministic initialisation of
    ``init_shard``."""
    for i, s in enumerate(layout.shards[rank] if shards is None else shards):
        target = local.table_weight(i)
        source = module.table_weight(s.table)
        if source.device.type == "meta":
            init_shard(layout.configs[s.table], s, target)
        else:
            target.copy_(source[s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols])


def init_shard(config, shard, target: torch.Tensor) -> None:
    """Initialise one shard as the whole table would be, whatever the plan: the table's rows
    are drawn in blocks of ``INIT_BLOCK_ROWS``, each from a generator seeded by the table's name
    and the block's index, and the shard keeps its rows and columns of them. A config's
    ``init_fn`` is called on the shard's view instead."""
    if config.init_fn is not None:
        result = config.init_fn(target)
        if isinstance(result, torch.Tensor) and result.data_ptr() != target.data_ptr():
            target.copy_(result)
        return
    seed = zlib.crc32(config.name.encode())
    first, last = shard.row_offset, shard.row_offset + shard.rows
    for block in range(first // INIT_BLOCK_ROWS, -(-last // INIT_BLOCK_ROWS)):
        lo = block * INIT_BLOCK_ROWS
        hi = min(lo + INIT_BLOCK_ROWS, config.num_embeddings)
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.empty(hi - lo, config.embedding_dim).uniform_(config.weight_init_min, config.weight_init_max,
                                                                   generator=g)
        a, z = max(lo, first), min(hi, last)
        target[a - first:z - first] = rows[a - lo:z - lo, shard.col_offset:shard.col_offset + shard.cols]


def check_env(owner: str, env: ShardingEnv, device: Optional[torch.device], module: nn.Module) -> torch.device:
    """The device the shards live on (default: the module's), after checking the env."""
    if env.process_group is None and env.world_size > 1:
        raise ValueError(f"{owner}: sharding over several ranks needs a process group "
                         f"(ShardingEnv.from_process_group)")
    device = torch.device(device) if device is not None else module.device
    if device.type == "meta":
        raise ValueError(f"{owner}: give the device the shards live on (the module is on meta)")
    return device


def build_local_collection(module: nn.Module, layout: ShardLayout, rank: int, device: torch.device,
                           fused: Optional[FusedOptimizer], shards: Optional[List[Shard]] = None,
                           exact_columns: bool = False, **kwargs) -> Optional[nn.Module]:
    """Rank ``rank``'s shards (or ``shards`` of them) as one collection of ``module``'s type and
    settings, holding their weights (None when there are none). ``exact_columns``: the caller
    combines column blocks' row sums (see :func:`check_fused`). ``kwargs``: the type's own settings."""
    check_fused(layout, fused, exact_columns)
    configs = layout.local_configs(rank, shards)
    if not configs:
        return None
    options = module.options
    local = type(module)(configs, device=device, backend=options.backend, sparse=options.sparse, validate=False,
                         bounds_check=options.bounds_check, deterministic=options.deterministic,
                         fused_optimizer=fused, **kwargs)
    copy_shards(local, module, layout, rank, shards)
    return local
