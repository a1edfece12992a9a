"""Where each shard of a plan lives and how a batch reaches it and comes back: pure Python,
computed once when a collection is sharded, identical on every rank.

Every rank holds one local collection of its shards, served by one op call per dtype. Its
tables come in three kinds, by what the output dist does with their pooled columns:

* ``exchange`` (TABLE_WISE, COLUMN_WISE, TABLE_ROW_WISE): the rank pools the whole global
  batch (every rank's bags, rank by rank) and sends each rank its bags' rows back with one
  all-to-all. TABLE_ROW_WISE shards send partial sums, which the receiving rank adds up.
* ``reduce`` (ROW_WISE over all ranks): every rank pools its rows' partial sums for the global
  batch; one reduce-scatter adds them up and leaves each rank its own bags.
* ``replica`` (DATA_PARALLEL): every rank pools the global batch through its full copy and
  keeps its own bags; the backward all-gathers the output gradient, so every copy takes the
  same step and the copies stay equal without a gradient all-reduce.

With a fused optimizer whose step reads sums over whole rows (``needs_whole_rows``), the
tables split into column blocks are *exact* (``exact_tables``): their shards come first among
a rank's exchange shards and are served by a collection of their own, whose step combines
the column blocks' row sums (``exact_columns.py``).

Row-split shards (ROW_WISE, TABLE_ROW_WISE) get only the ids in their row range, shifted to
the shard's first row, and pool by SUM; a MEAN table's division by the bag length happens
on the rank that owns the bag, after the partial sums are added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, PoolingType
from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ShardingType

EXCHANGE, REDUCE, REPLICA = "exchange", "reduce", "replica"
_KIND = {ShardingType.TABLE_WISE.value: EXCHANGE, ShardingType.COLUMN_WISE.value: EXCHANGE,
         ShardingType.TABLE_ROW_WISE.value: EXCHANGE, ShardingType.ROW_WISE.value: REDUCE,
         ShardingType.DATA_PARALLEL.value: REPLICA}
_ROW_SPLIT = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


@dataclass(frozen=True)
class Shard:
    """One block of one table, held by one rank as one table of its local collection."""

    table: int          # config index in the unsharded collection
    index: int          # position among the table's shards
    rank: int
    kind: str           # EXCHANGE, REDUCE or REPLICA
    row_split: bool     # ids are bucketized by row to this shard
    row_offset: int
    rows: int
    col_offset: int
    cols: int
    local_name: str     # the local collection's table name

    def local_feature(self, feature: str) -> str:
        """The local collection's KJT key for the unsharded feature ``feature`` of this shard."""
        return f"{self.local_name}:{feature}"


@dataclass(frozen=True)
class OutputColumn:
    """One block of received columns and where it lands in the unsharded output."""

    width: int
    target: int          # first output column
    mean_feature: int    # output feature to divide by its bag length afterwards, or -1


class ShardLayout:
    """The shards of one collection under one plan, for a world of ``world_size`` ranks.

    Attributes (per rank ``r``): ``shards[r]`` (local table order: exchange, reduce, replica),
    ``local_features[r]`` (``(local key, unsharded key, shard)``, the order rank ``r``'s local
    collection reads its KJT in, which is also its output column order); and, the same on
    every rank, ``reduce_blocks`` (``(table, feature, dim)`` of the reduce-scatter buffer's
    column blocks), ``replica_blocks`` (the same for replicas) and ``exact_tables`` (the tables
    split into column blocks when ``whole_rows``: a fused optimizer steps rows by their sums).
    """

    def __init__(self, configs: Sequence[EmbeddingBagConfig], plan: EmbeddingModuleShardingPlan,
                 world_size: int, whole_rows: bool = False) -> None:
        names = [c.name for c in configs]
        missing = [n for n in names if n not in plan]
        if missing:
            raise ValueError(f"the sharding plan has no entry for tables {missing}")
        unknown = sorted(set(plan) - set(names))
        if unknown:
            raise ValueError(f"the sharding plan names tables the collection lacks: {unknown}")
        self.configs = list(configs)
        self.world_size = world_size
        per_rank: List[List[Shard]] = [[] for _ in range(world_size)]
        self.table_shards: List[List[Shard]] = []
        for t, config in enumerate(configs):
            shards = _shards_of(t, config, plan[config.name], world_size)
            self.table_shards.append(shards)
            for s in shards:
                if s.rows > 0 and s.cols > 0:
                    per_rank[s.rank].append(s)
        self.exact_tables = frozenset(
            t for t, shards in enumerate(self.table_shards)
            if whole_rows and len(shards) > 1 and shards[0].kind == EXCHANGE and not shards[0].row_split)
        order = {EXCHANGE: 0, REDUCE: 1, REPLICA: 2}
        # exact shards first: their collection's output leads the rank's exchange columns
        self.shards = [sorted(shards, key=lambda s: (order[s.kind], s.table not in self.exact_tables, s.table,
                                                     s.index)) for shards in per_rank]
        self.local_features = [[(s.local_feature(f), f, s) for s in shards for f in configs[s.table].feature_names]
                               for shards in self.shards]
        # output features in the unsharded order, and their first output column
        self.output_features: List[Tuple[int, str]] = [(t, f) for t, c in enumerate(configs) for f in c.feature_names]
        starts, column = {}, 0
        for t, f in self.output_features:
            starts[(t, f)] = column
            column += configs[t].embedding_dim
        self.output_width = column
        self._output_start = starts
        self.reduce_blocks = [(t, f, configs[t].embedding_dim) for t, f in self.output_features
                              if self.table_kind(t) == REDUCE]
        self.replica_blocks = [(t, f, configs[t].embedding_dim) for t, f in self.output_features
                               if self.table_kind(t) == REPLICA]
        self.mean_row_split = [i for i, (t, f) in enumerate(self.output_features)
                               if getattr(configs[t], "pooling", None) == PoolingType.MEAN
                               and self.table_shards[t][0].row_split]

    def table_kind(self, table: int) -> str:
        return self.table_shards[table][0].kind

    def exact_shards(self, rank: int) -> List[Shard]:
        """Rank ``rank``'s shards of exact tables (the first of ``shards[rank]``)."""
        return [s for s in self.shards[rank] if s.table in self.exact_tables]

    def other_shards(self, rank: int) -> List[Shard]:
        """Rank ``rank``'s other shards, in their local order."""
        return [s for s in self.shards[rank] if s.table not in self.exact_tables]

    def local_configs(self, rank: int, shards: Optional[Sequence[Shard]] = None) -> List[BaseEmbeddingConfig]:
        """Rank ``rank``'s local tables (or those of ``shards``), of the unsharded configs' type:
        one per shard, reading its local keys; row-split shards of a bag table pool by SUM (the
        owner of the bag divides a MEAN)."""
        out = []
        for s in (self.shards[rank] if shards is None else shards):
            c = self.configs[s.table]
            fields = dict(num_embeddings=s.rows, embedding_dim=s.cols, name=s.local_name, data_type=c.data_type,
                          feature_names=[s.local_feature(f) for f in c.feature_names],
                          weight_init_min=c.weight_init_min, weight_init_max=c.weight_init_max)
            if isinstance(c, EmbeddingBagConfig):
                fields["pooling"] = PoolingType.SUM if s.row_split else c.pooling
            out.append(type(c)(**fields))
        return out

    def exchange_width(self, rank: int) -> int:
        """Columns of rank ``rank``'s local output that the all-to-all sends."""
        return sum(s.cols for _, _, s in self.local_features[rank] if s.kind == EXCHANGE)

    def received_columns(self) -> List[OutputColumn]:
        """The columns a rank holds after the output dist, in the order they are laid side by
        side: every rank's exchange columns (rank by rank), then the reduce-scatter's, then the
        replicas'."""
        mean = {self.output_features[i]: i for i in self.mean_row_split}
        blocks = []
        for r in range(self.world_size):
            for _, f, s in self.local_features[r]:
                if s.kind == EXCHANGE:
                    blocks.append(OutputColumn(s.cols, self._output_start[(s.table, f)] + s.col_offset,
                                               mean.get((s.table, f), -1)))
        for t, f, dim in self.reduce_blocks + self.replica_blocks:
            blocks.append(OutputColumn(dim, self._output_start[(t, f)], mean.get((t, f), -1)))
        return blocks

    def keys_needed(self) -> List[str]:
        """The unsharded KJT keys the collection reads, in first-use order."""
        return list(dict.fromkeys(f for _, f in self.output_features))

    def shards_by_name(self) -> Dict[str, Shard]:
        return {s.local_name: s for shards in self.shards for s in shards}


def _shards_of(t: int, config: EmbeddingBagConfig, p, world_size: int) -> List[Shard]:
    kind = _KIND[p.sharding_type]
    name = config.name
    if p.sharding_type == ShardingType.DATA_PARALLEL.value:
        return [Shard(t, r, r, kind, False, 0, config.num_embeddings, 0, config.embedding_dim, f"{name}__dp")
                for r in range(world_size)]
    specs = p.shards
    if not specs:
        raise ValueError(f"table '{name}': a {p.sharding_type} plan entry needs a sharding_spec with its shards")
    row_split = p.sharding_type in _ROW_SPLIT
    shards = []
    for i, m in enumerate(specs):
        (r0, c0), (nr, nc) = m.shard_offsets, m.shard_sizes
        if not 0 <= m.rank < world_size:
            raise ValueError(f"table '{name}': shard {i} is placed on rank {m.rank}, outside the world of "
                             f"{world_size} ranks")
        shards.append(Shard(t, i, m.rank, kind, row_split, r0, nr, c0, nc, f"{name}__{i}"))
    _check_cover(name, config, shards, row_split)
    if p.sharding_type == ShardingType.ROW_WISE.value and sorted(s.rank for s in shards) != list(range(world_size)):
        raise ValueError(f"table '{name}': row_wise needs one row block on every rank, got ranks "
                         f"{[s.rank for s in shards]}")
    return shards


def _check_cover(name: str, config: EmbeddingBagConfig, shards: List[Shard], row_split: bool) -> None:
    """The shards must tile the table: row blocks in order over all rows and every column, or
    column blocks in order over all columns and every row."""
    rows, dim = config.num_embeddings, config.embedding_dim
    if row_split or len(shards) == 1:
        edge, full = [(s.row_offset, s.rows) for s in shards], all(s.col_offset == 0 and s.cols == dim for s in shards)
        total = rows
    else:
        edge, full = [(s.col_offset, s.cols) for s in shards], all(s.row_offset == 0 and s.rows == rows for s in shards)
        total = dim
    at = 0
    for start, size in edge:
        if start != at or size < 0:
            full = False
        at = start + size
    if not full or at != total:
        raise ValueError(f"table '{name}' ({rows} x {dim}): its shards "
                         f"{[(s.row_offset, s.col_offset, s.rows, s.cols) for s in shards]} "
                         f"(row offset, column offset, rows, columns) do not tile the table")
