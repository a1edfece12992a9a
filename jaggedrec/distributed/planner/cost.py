"""The planner's cost model: per table and sharding type, what each rank holds and spends.

For a table of ``rows x dim`` elements of ``e`` bytes, read by ``k`` features whose mean bag
lengths sum to ``P``, on ``W`` ranks of ``B`` bags each, split into ``n`` shards:

* memory of a shard (bytes) = its rows x columns x (``e`` + per-element state) + its rows x
  per-row state. The state is what training keeps beside the weights: a dense gradient (``e``
  an element) without a fused optimizer, nothing for fused SGD, 4 bytes a row for row-wise
  Adagrad, 8 bytes an element for Adam.
* lookup bytes of a shard per step = the ids it sees x its columns x ``e``. Every shard sees
  the global batch's ``W*B*P`` ids, but a row block sees ``1/n`` of them.
* communication bytes of a shard per step, forward and backward together: its ids (8 bytes
  each) and its pooled columns for every bag of the global batch, out and back as fp32,
  ``2 * W*B * k * cols * 4``. That holds for TABLE_WISE and COLUMN_WISE (all-to-all), and for
  ROW_WISE (reduce-scatter) and TABLE_ROW_WISE (all-to-all, across hosts too), whose blocks
  send partial sums for every bag. DATA_PARALLEL copies pool the global batch too and keep
  their own bags; only the output gradient comes back, ``W*B * k * dim * 4``.

The share ``(W - 1) / W`` of the communication leaves the rank, so one rank alone has none.
A shard's cost (seconds) = lookup bytes / memory bandwidth + bytes leaving / link bandwidth.
These are estimates to balance ranks by, not predictions of step time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

from jaggedrec.distributed.types import ShardingType
from jaggedrec.distributed.planner.types import Topology

_ID_BYTES = 8
_OUT_BYTES = 4  # pooled outputs and their gradients are fp32


@dataclass(frozen=True)
class TableSpec:
    """What the planner knows of one table."""

    name: str
    rows: int
    dim: int
    element_bytes: int
    num_features: int
    pooling: float          # sum of the features' mean bag lengths
    state_per_row: int      # optimizer bytes per row
    state_per_element: int  # optimizer or gradient bytes per element

    @property
    def weight_bytes(self) -> int:
        return self.rows * self.dim * self.element_bytes

    def memory(self, rows: int, cols: int) -> int:
        """Bytes a shard of ``rows x cols`` holds."""
        return rows * cols * (self.element_bytes + self.state_per_element) + rows * self.state_per_row


class ShardCost(NamedTuple):
    rank: int
    memory: int    # bytes
    cost: float    # seconds per step (estimate)


_ROW_SPLIT = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
_REPLICA = ShardingType.DATA_PARALLEL.value


def shard_costs(table: TableSpec, sharding_type: str, ranks: List[int], row_sizes: List[int],
                col_sizes: List[int], topology: Topology, num_shards: Optional[int] = None) -> List[ShardCost]:
    """One ``ShardCost`` per shard, shard ``i`` on ``ranks[i]`` with ``row_sizes[i] x col_sizes[i]``,
    of a layout of ``num_shards`` (default: as many as given)."""
    w = topology.world_size
    bags = w * topology.batch_size
    ids = bags * table.pooling
    share = 1 / (num_shards or len(ranks)) if sharding_type in _ROW_SPLIT else 1.0  # of the ids a shard sees
    out_per_col = (1 if sharding_type == _REPLICA else 2) * bags * table.num_features * _OUT_BYTES
    # seconds per column looked up and sent, and per shard for its ids
    per_col = (ids * share * table.element_bytes / topology.memory_bandwidth
               + (w - 1) / w * out_per_col / topology.comm_bandwidth)
    per_shard = (w - 1) / w * ids * share * _ID_BYTES / topology.comm_bandwidth
    per_element = table.element_bytes + table.state_per_element
    return [ShardCost(rank, rows * cols * per_element + rows * table.state_per_row, per_shard + cols * per_col)
            for rank, rows, cols in zip(ranks, row_sizes, col_sizes)]
