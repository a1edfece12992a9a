"""Where a sharded managed-collision collection keeps each bucket, and in what order a rank
receives the ids it remaps (``mc_modules.ShardedManagedCollisionCollection``): pure Python on
the plan, the same on every rank, no collective.

A table's buckets are fixed row ranges (``bucket_segments()``, the same under every plan);
bucket ``k`` lives on the rank holding the embedding row where it starts. The buckets one rank
holds side by side form a *run*. A table whose module can hold a run as one state
(``holds_bucket_runs()``: the hash tables' ``HashBucketModule``) gets one module per run, so a
rank holds one module per table whatever the bucket count; other modules (MCH, HashZch) get one
per bucket (runs of one). Buckets stay the unit a checkpoint moves: run edges are bucket edges.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from jaggedrec.distributed.types import EmbeddingModuleShardingPlan, ShardingType

_OWNER = "ShardedManagedCollisionCollection"


class BucketLayout:
    """Which rank holds each bucket of each table under one plan.

    ``segments[t]``: the ``K + 1`` row edges of table ``t``'s buckets; ``owners[t][k]``: the
    rank of bucket ``k``; ``runs[t]``: ``(first bucket, buckets, rank)`` of each run, in bucket
    order; ``slots[r]``: ``(table, run, feature)`` in the order rank ``r`` receives ids (its runs
    in table order, each run's features in order); ``slot_index[t]``: ``[K, F]`` int64, the
    global slot (ranks' slots one after another) of bucket ``k``'s ids of feature ``f``.
    """

    def __init__(self, configs, segments: List[List[int]], plan: EmbeddingModuleShardingPlan, world_size: int,
                 runs: Sequence[bool] = ()) -> None:
        self.names = [c.name for c in configs]
        self.features = [list(c.feature_names) for c in configs]
        self.segments: List[List[int]] = []
        self.owners: List[List[int]] = []
        self.runs: List[List[Tuple[int, int, int]]] = []
        for t, (c, edges) in enumerate(zip(configs, segments)):
            if c.name not in plan:
                raise ValueError(f"{_OWNER}: the sharding plan has no entry for table '{c.name}'")
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"{_OWNER}: table '{c.name}' has an empty bucket (row edges {edges}); give it "
                                 f"fewer buckets than rows")
            owners = _owners(c.name, plan[c.name], [start - edges[0] for start in edges[:-1]], world_size)
            self.segments.append(list(edges))
            self.owners.append(owners)
            self.runs.append(_runs(owners, bool(runs[t]) if t < len(runs) else False))
        self.slots: List[List[Tuple[int, int, int]]] = [[] for _ in range(world_size)]
        for t, table_runs in enumerate(self.runs):
            for j, (_, _, r) in enumerate(table_runs):
                self.slots[r].extend((t, j, f) for f in range(len(self.features[t])))
        starts = [0]
        for slots in self.slots:
            starts.append(starts[-1] + len(slots))
        self.slot_starts = starts
        index = {slot: starts[r] + i for r, slots in enumerate(self.slots) for i, slot in enumerate(slots)}
        self.slot_index = []
        for t, table_runs in enumerate(self.runs):
            per_run = torch.tensor([[index[(t, j, f)] for f in range(len(self.features[t]))]
                                    for j in range(len(table_runs))], dtype=torch.int64).view(len(table_runs), len(self.features[t]))
            run_of = torch.repeat_interleave(torch.arange(len(table_runs)),
                                             torch.tensor([n for _, n, _ in table_runs], dtype=torch.int64))
            self.slot_index.append(per_run[run_of])
        # [S] the rank receiving each global slot (counts per rank in one reduction)
        self.slot_rank = torch.repeat_interleave(torch.arange(world_size), torch.tensor(
            [len(s) for s in self.slots], dtype=torch.int64))

    def runs_of(self, rank: int) -> List[Tuple[int, int]]:
        """``(table, run)`` held by ``rank``, in its slots' order."""
        return list(dict.fromkeys((t, j) for t, j, _ in self.slots[rank]))

    def run_rows(self, table: int, run: int) -> Tuple[int, int]:
        """The run's ``(first row, end row)`` (global rows of the table's module)."""
        first, count, _ = self.runs[table][run]
        seg = self.segments[table]
        return seg[first], seg[first + count]


def _runs(owners: List[int], join: bool) -> List[Tuple[int, int, int]]:
    """Maximal runs of consecutive buckets on one rank (``join``), else one run per bucket."""
    out: List[Tuple[int, int, int]] = []
    for k, r in enumerate(owners):
        if join and out and out[-1][2] == r:
            first, count, _ = out[-1]
            out[-1] = (first, count + 1, r)
        else:
            out.append((k, 1, r))
    return out


def _owners(name: str, p, rows: List[int], world_size: int) -> List[int]:
    """The rank holding each of ``rows`` of a table (the first column block's, for column shards)."""
    if p.sharding_type == ShardingType.DATA_PARALLEL.value:
        raise ValueError(f"{_OWNER}: table '{name}' is data_parallel; a managed-collision table keeps one id map, "
                         f"so shard it table-wise, row-wise or column-wise")
    blocks = []
    for m in p.shards:
        (r0, _), (nr, nc) = m.shard_offsets, m.shard_sizes
        if nr > 0 and nc > 0:
            if not 0 <= m.rank < world_size:
                raise ValueError(f"{_OWNER}: table '{name}' is placed on rank {m.rank}, outside the world of "
                                 f"{world_size} ranks")
            blocks.append((r0, r0 + nr, m.rank))
    out = []
    for row in rows:
        rank = next((r for a, b, r in blocks if a <= row < b), None)
        if rank is None:
            raise ValueError(f"{_OWNER}: no shard of table '{name}' holds row {row}")
        out.append(rank)
    return out
