"""``EmbeddingShardingPlanner``: greedy placement that balances the cost model's estimates
(``cost.py``) under each rank's memory cap. Pure Python: it needs no process group, so it can
plan thousands of tables for thousands of ranks in a test.

Tables go largest first, by the larger of their shares of the total estimated cost and memory.
A table with weights under ``dp_bytes`` goes DATA_PARALLEL when that is allowed, W > 1 and
the copies fit. Any other table weighs every allowed layout that fits the memory caps:

* TABLE_WISE on the least pressed rank with room;
* COLUMN_WISE over the n least pressed ranks, for n = 2, 4, 8, ... (blocks of 4 columns or more);
* ROW_WISE over every rank; TABLE_ROW_WISE over the least loaded host;
* DATA_PARALLEL;

where a rank's pressure is the larger of its estimated cost and memory, each over the even
split of all tables' table-wise figures. It takes the layout with the smallest projected
pressure (the most pressed rank after it, or the mean cost once every table is placed), the
smallest total cost among equals. So a table goes whole to one rank while that fits under the
current maximum, and is split only when it would stand out; a table that fits on no rank whole
is split too, or the planner raises ``PlannerError`` naming it.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist
from torch import nn

from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig
from jaggedrec.distributed import sharding_plan as hand
from jaggedrec.distributed.embedding_types import EmbeddingComputeKernel
from jaggedrec.distributed.sharding_plan import block_sizes, get_default_sharders
from jaggedrec.distributed.types import (EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan, ShardingPlanner,
                                         ShardingType)
from jaggedrec.distributed.planner.cost import TableSpec, shard_costs
from jaggedrec.distributed.planner.types import ParameterConstraints, PlannerError, Topology


def table_specs(configs: Sequence[BaseEmbeddingConfig], fused_optimizer, constraints: Dict[str, ParameterConstraints]
                ) -> List[TableSpec]:
    """The cost model's view of a collection's tables under its training mode."""
    specs = []
    for c in configs:
        element = c.data_type.to_torch().itemsize
        per_row, per_element = 0, element  # no fused optimizer: a dense gradient beside the weights
        if fused_optimizer is not None:
            per_element = 4 * sum(per == "element" for _, per in fused_optimizer.state)
            per_row = 4 * sum(per == "row" for _, per in fused_optimizer.state)
        factors = constraints[c.name].pooling_factors if c.name in constraints else [1.0]
        pooling = sum(factors[i] if i < len(factors) else factors[-1] for i in range(len(c.feature_names)))
        specs.append(TableSpec(c.name, c.num_embeddings, c.embedding_dim, element, len(c.feature_names), pooling,
                               per_row, per_element))
    return specs


class EmbeddingShardingPlanner(ShardingPlanner):
    """Args:
        topology: the ranks (default: one CUDA rank).
        constraints: table name -> ``ParameterConstraints``.
        dp_bytes: tables with fewer weight bytes go DATA_PARALLEL where the copies fit (default 0:
            none). jaggedrec's replicas pool the global batch on every rank, which keeps fused
            optimizers exact but saves no communication, so the cost model never prefers them;
            this is for tables whose update should be replicated all the same.
    """

    def __init__(self, topology: Optional[Topology] = None,
                 constraints: Optional[Dict[str, ParameterConstraints]] = None, dp_bytes: int = 0) -> None:
        self._topology = topology or Topology(world_size=1)
        self._constraints = dict(constraints or {})
        self._dp_bytes = dp_bytes
        self._stats = ""

    # --- entry points ------------------------------------------------------------------
    def plan(self, module: nn.Module, sharders: Optional[list] = None) -> ShardingPlan:
        """One module plan per collection in ``module`` ("" when it is one itself) that a sharder
        in ``sharders`` (default: jaggedrec's) shards; tables of all of them share the ranks."""
        collections = _collections(module, sharders)
        if not collections:
            raise PlannerError(f"{type(module).__name__} holds no embedding collection to shard")
        specs, owners, fused, exact = [], [], [], []
        for path, collection, sharder in collections:
            optimizer = _training_optimizer(collection, sharder)
            configs = (collection.embedding_bag_configs() if hasattr(collection, "embedding_bag_configs")
                       else collection.embedding_configs())
            for spec in table_specs(configs, optimizer, self._constraints):
                specs.append(spec)
                owners.append(path)
                fused.append(optimizer)
                exact.append(bool(getattr(sharder, "exact_columns", False)))
        placed = self.plan_tables(specs, fused, exact)
        plan = ShardingPlan({path: EmbeddingModuleShardingPlan() for path, _, _ in collections})
        for spec, path, sharding in zip(specs, owners, placed):
            plan.plan[path][spec.name] = sharding
        return plan

    def collective_plan(self, module: nn.Module, sharders: Optional[list] = None, pg=None) -> ShardingPlan:
        """Rank 0 plans and broadcasts, so every rank shards by one plan."""
        if not dist.is_initialized() or dist.get_world_size(pg) == 1:
            return self.plan(module, sharders)
        box = [self.plan(module, sharders) if dist.get_rank(pg) == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0) if pg is not None else 0, group=pg)
        return box[0]

    def stats(self) -> str:
        """Per rank, the last plan's estimated memory (and its share of the cap) and cost."""
        return self._stats

    # --- placement ---------------------------------------------------------------------
    def plan_tables(self, specs: Sequence[TableSpec], fused: Optional[Sequence] = None,
                    exact_columns: Optional[Sequence[bool]] = None) -> List[ParameterSharding]:
        """A ``ParameterSharding`` per table spec, in order. ``fused``: each table's fused
        optimizer (None: dense); ``exact_columns``: whether its sharded collection steps
        column-wise shards of an optimizer that reads whole rows (default: yes, as both of
        jaggedrec's collections do, see ``CollectionSharder.exact_columns``; where not, its
        tables are kept whole in columns)."""
        topo = self._topology
        fused = list(fused) if fused is not None else [None] * len(specs)
        exact_columns = list(exact_columns) if exact_columns is not None else [True] * len(specs)
        whole = [shard_costs(s, ShardingType.TABLE_WISE.value, [0], [s.rows], [s.dim], topo)[0] for s in specs]
        ranks = _Ranks(topo.world_size, sum(c.cost for c in whole), sum(c.memory for c in whole))
        # largest first by the larger of its shares of all tables' cost and of their memory
        size = [max(c.cost / ranks.cost_total, c.memory / ranks.memory_total) for c in whole]
        out: List[Optional[ParameterSharding]] = [None] * len(specs)
        for i in sorted(range(len(specs)), key=lambda i: -size[i]):
            spec = specs[i]
            ranks.remaining -= whole[i].cost
            sharding, charges = self._place(spec, self._allowed(spec, fused[i], exact_columns[i]), ranks)
            sharding.compute_kernel = (EmbeddingComputeKernel.FUSED.value if fused[i] is not None
                                       else EmbeddingComputeKernel.DENSE.value)
            ranks.charge(charges)
            out[i] = sharding
        self._stats = _format_stats(ranks.memory, ranks.load, topo.memory_cap)
        return out  # type: ignore[return-value]

    def _allowed(self, spec: TableSpec, optimizer, exact_columns: bool = True) -> List[str]:
        kinds = [t.value for t in ShardingType]
        constraint = self._constraints.get(spec.name)
        if constraint is not None and constraint.sharding_types:
            kinds = [k.value if isinstance(k, ShardingType) else k for k in constraint.sharding_types]
        if optimizer is not None and optimizer.needs_whole_rows and not exact_columns:  # see shards.check_fused
            kinds = [k for k in kinds if k != ShardingType.COLUMN_WISE.value]
        if not kinds:
            raise PlannerError(f"table '{spec.name}': no sharding type is left (constraints, and column-wise "
                               f"is refused with the fused {type(optimizer).__name__})")
        return kinds

    def _place(self, spec: TableSpec, allowed: List[str], ranks: "_Ranks"):
        """The best layout that fits, and what it charges each rank: {rank: (bytes, seconds)}.

        A rank's pressure is the larger of its estimated cost and its memory, each as a share of
        the even split of all tables' table-wise figures. A layout's score is the pressure it
        projects: the most pressed rank after it, or the mean cost once every table is placed
        (those still to come counted table-wise), so that a split's extra traffic counts
        against it; the least total cost breaks ties, which keeps tables whole where they fit."""
        topo, cap = self._topology, self._topology.memory_cap
        memory = ranks.memory
        top = max(ranks.pressures)
        best, best_score, refused = None, None, []
        for kind, generator, on, rows, cols in self._candidates(spec, allowed, ranks):
            per_size = ({size: shard_costs(spec, kind, [0], [size[0]], [size[1]], topo, len(on))[0]
                         for size in set(zip(rows, cols))} if len(on) == topo.world_size else {})
            need = max((c.memory for c in per_size.values()), default=0)
            if per_size and ranks.max_memory + need <= cap:
                # on every rank, and it fits even the fullest: scored from the books' maxima
                runs = [(size, len(list(group))) for size, group in itertools.groupby(zip(rows, cols))]
                added = sum(per_size[size].cost * n for size, n in runs)
                after = ranks.pressure_after_runs([(n, per_size[size].memory, per_size[size].cost) for size, n in runs])
                charges = None
            else:
                charges = {rank: (mem, cost) for rank, mem, cost in shard_costs(spec, kind, on, rows, cols, topo)}
                full = [r for r, (mem, _) in charges.items() if memory[r] + mem > cap]
                if full:
                    r = full[0]
                    refused.append(f"{kind} needs {charges[r][0]} bytes on rank {r}, which has "
                                   f"{cap - memory[r]} left")
                    continue
                added = sum(c for _, c in charges.values())
                after = max(map(ranks.pressure, charges, *zip(*charges.values())))
            score = (max(top, after, ranks.projected_mean(added)), added)
            if best_score is None or score < best_score:
                best, best_score = (kind, generator, on, rows, cols, charges), score
        if best is None:
            raise PlannerError(f"table '{spec.name}' ({spec.rows} x {spec.dim}, {spec.weight_bytes} bytes of weights) "
                               f"fits no allowed layout ({allowed}) within the cap of {cap} bytes a rank: "
                               + "; ".join(refused or ["no layout applies to this world"]))
        kind, generator, on, rows, cols, charges = best
        if charges is None:
            charges = {rank: (mem, cost) for rank, mem, cost in shard_costs(spec, kind, on, rows, cols, topo)}
        return generator(spec.rows, spec.dim, topo.local_world_size, topo.world_size, topo.compute_device), charges

    def _candidates(self, spec: TableSpec, allowed: List[str], ranks: "_Ranks"):
        """(sharding type, its generator, and the shards' ranks, rows and columns) per layout;
        no layout puts two shards of a table on one rank."""
        topo = self._topology
        memory, load = ranks.memory, ranks.load
        w, local = topo.world_size, topo.local_world_size
        rows, dim = spec.rows, spec.dim
        everyone = list(range(w))
        dp = ShardingType.DATA_PARALLEL.value
        replica = (dp, hand.data_parallel(), everyone, [rows] * w, [dim] * w)
        if (w > 1 and dp in allowed and spec.weight_bytes < self._dp_bytes
                and all(m + spec.memory(rows, dim) <= topo.memory_cap for m in memory)):
            yield replica
            return
        by_load = ranks.least_pressed()
        if ShardingType.TABLE_WISE.value in allowed or w == 1:  # one rank: whatever was asked, it is TW
            need = spec.memory(rows, dim)
            rank = next((r for r in by_load if memory[r] + need <= topo.memory_cap), by_load[0])
            yield ShardingType.TABLE_WISE.value, hand.table_wise(rank), [rank], [rows], [dim]
            if w == 1:
                return
        if ShardingType.COLUMN_WISE.value in allowed:
            n = 2
            while n <= min(w, dim // 4):
                on = by_load[:n]
                yield ShardingType.COLUMN_WISE.value, hand.column_wise(on), on, [rows] * n, block_sizes(dim, n)
                n *= 2
        if w > 1 and ShardingType.ROW_WISE.value in allowed:
            yield ShardingType.ROW_WISE.value, hand.row_wise(), everyone, block_sizes(rows, w), [dim] * w
        if local > 1 and ShardingType.TABLE_ROW_WISE.value in allowed:
            host = min(range(topo.hosts), key=lambda h: sum(load[h * local:(h + 1) * local]))
            on = list(range(host * local, (host + 1) * local))
            yield (ShardingType.TABLE_ROW_WISE.value, hand.table_row_wise(host), on, block_sizes(rows, local),
                   [dim] * local)
        if w > 1 and dp in allowed:
            yield replica


class _Ranks:
    """The planner's books: each rank's estimated memory (bytes) and cost (seconds per step).

    A rank's pressure is the larger of the two, each over the even split of all tables'
    table-wise figures."""

    def __init__(self, world: int, cost_total: float, memory_total: int) -> None:
        self.memory, self.load = [0] * world, [0.0] * world
        self.cost_total, self.memory_total = cost_total or 1.0, memory_total or 1
        self.remaining = cost_total  # table-wise cost of the tables not placed yet
        self._cost_unit, self._memory_unit = self.cost_total / world, self.memory_total / world
        self.pressures = [0.0] * world
        self.max_memory, self.total_load = 0, 0.0

    def pressure(self, rank: int, memory: int = 0, cost: float = 0.0) -> float:
        return max((self.load[rank] + cost) / self._cost_unit, (self.memory[rank] + memory) / self._memory_unit)

    def pressure_after_runs(self, runs: List[tuple]) -> float:
        """The most pressed rank's pressure after charging every rank, in order, by ``runs`` of
        ``(ranks, bytes, seconds)`` each (row blocks: a few runs of equal blocks)."""
        top, at = 0.0, 0
        for n, memory, cost in runs:
            top = max(top, (max(self.load[at:at + n]) + cost) / self._cost_unit,
                      (max(self.memory[at:at + n]) + memory) / self._memory_unit)
            at += n
        return top

    def least_pressed(self) -> List[int]:
        return sorted(range(len(self.load)), key=self.pressures.__getitem__)

    def projected_mean(self, added: float) -> float:
        return (self.total_load + added + self.remaining) / len(self.load) / self._cost_unit

    def charge(self, charges: Dict[int, tuple]) -> None:
        for rank, (memory, cost) in charges.items():
            self.memory[rank] += memory
            self.load[rank] += cost
            self.pressures[rank] = self.pressure(rank)
            self.max_memory = max(self.max_memory, self.memory[rank])
            self.total_load += cost


def _collections(module: nn.Module, sharders: Optional[list]):
    """(path, collection, its sharder) for each outermost collection a sharder shards."""
    if not sharders:
        sharders = get_default_sharders()
    found = []
    for path, m in module.named_modules():
        if any(path == p or path.startswith(p + ".") or p == "" for p, _, _ in found):
            continue
        sharder = next((s for s in sharders if isinstance(m, s.module_type)), None)
        if sharder is not None:
            found.append((path, m, sharder))
    return found


def _training_optimizer(collection: nn.Module, sharder):
    """The fused optimizer the shards will step with (None: dense), as the sharder picks it."""
    if hasattr(sharder, "shard_optimizer"):
        return sharder.shard_optimizer(collection)
    return getattr(collection, "fused_optimizer", None)


def _format_stats(memory: List[int], load: List[float], cap: int) -> str:
    mean = sum(load) / len(load)
    lines = [f"{len(load)} ranks: estimated cost per step max {max(load) * 1e3:.3f} ms, mean {mean * 1e3:.3f} ms "
             f"(max / mean {max(load) / mean if mean else 1.0:.3f}); memory max {max(memory) / cap:.1%} of the cap"]
    if len(load) <= 16:
        lines += [f"rank {r}: {memory[r] / 2 ** 20:.1f} MiB ({memory[r] / cap:.1%}), {load[r] * 1e3:.3f} ms"
                  for r in range(len(load))]
    return "\n".join(lines)
