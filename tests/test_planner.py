"""EmbeddingShardingPlanner: constraints, memory caps, DP for tiny tables, errors that name
the table, and a plan of 1,000 tables on 128 and 1,024 ranks (pure Python, no process group).

Memory is recomputed here from the shards (weights plus a same-dtype dense gradient, or the
fused optimizer's state), not read from the planner's books."""

import math
import random
import time

import pytest
from torch import nn

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, PlannerError, Topology
from jaggedrec.distributed.planner.cost import shard_costs
from jaggedrec.distributed.planner.planners import table_specs
from jaggedrec.distributed.types import ShardingType

GIB = 1 << 30
TW, RW, CW, TWRW, DP = (t.value for t in (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE,
                                          ShardingType.TABLE_ROW_WISE, ShardingType.DATA_PARALLEL))


def _ebc(shapes, device="meta", data_types=None, **kwargs):
    tables = [jr.EmbeddingBagConfig(name=f"t{i}", num_embeddings=rows, embedding_dim=dim, feature_names=[f"f{i}"],
                                    data_type=(data_types[i] if data_types else jr.DataType.FP32))
              for i, (rows, dim) in enumerate(shapes)]
    return jr.EmbeddingBagCollection(tables=tables, device=device, **kwargs)


def _rank_memory(module_plan, configs, world, state_bytes):
    """Bytes per rank: each shard's elements x (element bytes + state bytes per element)."""
    memory = [0] * world
    for c in configs:
        sharding = module_plan[c.name]
        element = c.data_type.to_torch().itemsize
        per_element = element + state_bytes(element)
        if sharding.sharding_type == DP:
            for r in range(world):
                memory[r] += c.num_embeddings * c.embedding_dim * per_element
            continue
        for s in sharding.shards:
            memory[s.rank] += s.shard_sizes[0] * s.shard_sizes[1] * per_element
    return memory


def _assert_tiles(module_plan, configs, world):
    """Every non-replicated table's shards cover it exactly once, on ranks inside the world."""
    for c in configs:
        sharding = module_plan[c.name]
        if sharding.sharding_type == DP:
            assert sharding.shards == []
            continue
        covered = 0
        for s in sharding.shards:
            assert 0 <= s.rank < world
            (r0, c0), (nr, nc) = s.shard_offsets, s.shard_sizes
            assert 0 <= r0 and r0 + nr <= c.num_embeddings and 0 <= c0 and c0 + nc <= c.embedding_dim
            covered += nr * nc
        assert covered == c.num_embeddings * c.embedding_dim, c.name
        if sharding.sharding_type in (RW, TWRW):
            assert all(s.shard_offsets[1] == 0 and s.shard_sizes[1] == c.embedding_dim for s in sharding.shards)
        if sharding.sharding_type == CW:
            assert all(s.shard_offsets[0] == 0 and s.shard_sizes[0] == c.num_embeddings for s in sharding.shards)


def test_one_rank_puts_every_table_whole_on_rank_0():
    ebc = _ebc([(100, 8), (5000, 16), (7, 3)])
    plan = EmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu")).plan(ebc)
    assert list(plan.plan) == [""]
    for c in ebc.embedding_bag_configs():
        sharding = plan.plan[""][c.name]
        assert sharding.sharding_type == TW and sharding.ranks == [0]
        assert sharding.shards[0].shard_sizes == [c.num_embeddings, c.embedding_dim]
        assert sharding.shards[0].placement == "rank:0/cpu"


def test_constraints_are_honoured_and_tiny_tables_go_data_parallel():
    shapes = [(200_000, 64), (300_000, 32), (400_000, 16), (250_000, 8), (100, 4), (150_000, 12)]
    ebc = _ebc(shapes)
    constraints = {"t0": ParameterConstraints(sharding_types=[CW]),
                   "t1": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE]),
                   "t2": ParameterConstraints(sharding_types=[TWRW]),
                   "t3": ParameterConstraints(sharding_types=[TW]),
                   "t5": ParameterConstraints(sharding_types=[DP])}
    topology = Topology(world_size=4, local_world_size=2, compute_device="cpu")
    planner = EmbeddingShardingPlanner(topology, constraints, dp_bytes=4096)  # t4: 1.6 KB of weights
    module_plan = planner.plan(ebc).plan[""]
    assert [module_plan[f"t{i}"].sharding_type for i in range(6)] == [CW, RW, TWRW, TW, DP, DP]
    assert len(module_plan["t0"].shards) >= 2
    assert module_plan["t2"].ranks in ([0, 1], [2, 3])
    _assert_tiles(module_plan, ebc.embedding_bag_configs(), 4)
    assert "rank 3:" in planner.stats()


def test_a_table_too_big_for_one_rank_is_split_within_the_caps():
    ebc = _ebc([(1_000_000, 64), (1000, 64), (20_000, 64)])  # t0: 256 MB of weights, 512 MB with its gradient
    cap = 200 * 2 ** 20
    for allowed, expect in (([TW, RW], RW), ([TW, CW], CW), ([TW, TWRW], TWRW)):
        topology = Topology(world_size=4, local_world_size=4, compute_device="cuda", hbm_cap=cap)
        module_plan = EmbeddingShardingPlanner(topology, {"t0": ParameterConstraints(sharding_types=allowed)}
                                               ).plan(ebc).plan[""]
        assert module_plan["t0"].sharding_type == expect
        assert max(_rank_memory(module_plan, ebc.embedding_bag_configs(), 4, lambda e: e)) <= cap
        _assert_tiles(module_plan, ebc.embedding_bag_configs(), 4)


def test_errors_name_the_table():
    ebc = _ebc([(10_000, 16), (1_000_000, 64)])
    small = Topology(world_size=2, compute_device="cpu", ddr_cap=100 * 2 ** 20)
    with pytest.raises(PlannerError, match=r"table 't1' \(1000000 x 64.*fits no allowed layout \(\['table_wise'\]\)"):
        EmbeddingShardingPlanner(small, {"t1": ParameterConstraints(sharding_types=[TW])}).plan(ebc)
    with pytest.raises(PlannerError, match="table 't1'"):
        EmbeddingShardingPlanner(Topology(world_size=2, compute_device="cpu", ddr_cap=2 ** 20)).plan(ebc)
    # column-wise is the only type asked for, and a collection whose shards do not combine
    # column blocks' row sums refuses it under row-wise Adagrad (jaggedrec's two collections
    # combine them: test_planner_exact_columns.py)
    adagrad = optim.RowWiseAdagrad(0.1)
    constraints = {"t0": ParameterConstraints(sharding_types=[CW])}
    specs = table_specs([jr.EmbeddingConfig(name="t0", num_embeddings=10_000, embedding_dim=16, feature_names=["f0"])],
                        adagrad, constraints)
    with pytest.raises(PlannerError, match="table 't0': no sharding type is left"):
        EmbeddingShardingPlanner(Topology(world_size=2), constraints).plan_tables(specs, [adagrad], [False])
    with pytest.raises(PlannerError, match="holds no embedding collection"):
        EmbeddingShardingPlanner().plan(nn.Linear(2, 2))


def test_fused_optimizer_state_counts_with_rowwise_adagrad():
    shapes = [(2_000_000, 64)] + [(50_000, 32)] * 6
    ebc = _ebc(shapes)
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": "EXACT_ROWWISE_ADAGRAD", "learning_rate": 0.1})
    cap = 600 * 2 ** 20  # t0: 512 MB of weights and 8 MB of row state fit; with a dense gradient, 1 GB does not
    whole = {"t0": ParameterConstraints(sharding_types=[TW])}
    module_plan = EmbeddingShardingPlanner(Topology(world_size=4, hbm_cap=cap), whole).plan(ebc, [sharder]).plan[""]
    assert module_plan["t0"].sharding_type == TW
    assert all(s.compute_kernel == "fused" for s in module_plan.values())
    configs = ebc.embedding_bag_configs()
    state = [0] * 4  # one fp32 per row held
    for s in module_plan.values():
        for m in s.shards:
            state[m.rank] += 4 * m.shard_sizes[0]
    memory = [m + st for m, st in zip(_rank_memory(module_plan, configs, 4, lambda e: 0), state)]
    assert max(memory) <= cap
    with pytest.raises(PlannerError, match="table 't0'.*table_wise needs 1024000000 bytes"):
        EmbeddingShardingPlanner(Topology(world_size=4, hbm_cap=cap), whole).plan(ebc)


def test_nested_modules_get_a_plan_per_collection_and_print_it():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.sparse = nn.Module()
            self.sparse.ebc = _ebc([(4096, 16), (300, 8)])
            self.other = _ebc([(9000, 32)])
            self.dense = nn.Linear(4, 4)

    model = Model()
    planner = EmbeddingShardingPlanner(Topology(world_size=2, compute_device="cpu"))
    plan = planner.plan(model)
    assert sorted(plan.plan) == ["other", "sparse.ebc"]
    assert plan.get_plan_for_module("sparse.ebc") is plan.plan["sparse.ebc"]
    printed = str(plan)
    for path, name in (("sparse.ebc", "t0"), ("sparse.ebc", "t1"), ("other", "t0")):
        assert path in printed
        sharding = plan.plan[path][name]
        assert sharding.sharding_type in printed
    for m in plan.plan.values():
        for s in m.values():
            for shard in s.shards:
                assert f"{shard.shard_offsets}" in printed and f"{shard.shard_sizes}" in printed
    # no process group: the collective plan is the plan
    assert str(planner.collective_plan(model)) == printed


def _mixed_tables(n, seed):
    rnd = random.Random(seed)
    dims = [8, 16, 32, 64, 128, 256]
    rows = [int(10 ** rnd.uniform(3, 7)) for _ in range(n)]
    return ([(r, rnd.choice(dims)) for r in rows],
            [rnd.choice([jr.DataType.FP32, jr.DataType.FP16]) for _ in range(n)])


@pytest.mark.parametrize("world", [128, 1024])
def test_thousand_tables_plan_within_caps_and_balance(world):
    shapes, data_types = _mixed_tables(1000, seed=world)
    ebc = _ebc(shapes, data_types=data_types)
    configs = ebc.embedding_bag_configs()
    need = sum(r * d * 2 * c.data_type.to_torch().itemsize for (r, d), c in zip(shapes, configs))
    cap = int(1.5 * need / world)  # one and a half times the even share: the caps bind
    topology = Topology(world_size=world, local_world_size=8, hbm_cap=cap)
    planner = EmbeddingShardingPlanner(topology)
    # CPU seconds of this process: the planner's own work, whatever else the machine runs
    start, wall = time.process_time(), time.perf_counter()
    module_plan = planner.plan(ebc).plan[""]
    seconds, wall = time.process_time() - start, time.perf_counter() - wall
    assert seconds < 10, seconds
    _assert_tiles(module_plan, configs, world)
    memory = _rank_memory(module_plan, configs, world, lambda e: e)
    assert max(memory) <= cap
    # the cost model's estimate per rank, summed from each shard
    cost = [0.0] * world
    for spec in table_specs(configs, None, {}):
        s = module_plan[spec.name]
        if s.sharding_type == DP:
            ranks, rows, cols = list(range(world)), [spec.rows] * world, [spec.dim] * world
        else:
            ranks = [m.rank for m in s.shards]
            rows, cols = [m.shard_sizes[0] for m in s.shards], [m.shard_sizes[1] for m in s.shards]
        for c in shard_costs(spec, s.sharding_type, ranks, rows, cols, topology):
            cost[c.rank] += c.cost
    mean = sum(cost) / world
    kinds = {}
    for s in module_plan.values():
        kinds[s.sharding_type] = kinds.get(s.sharding_type, 0) + 1
    print(f"\nplanner: {world} ranks, 1000 tables in {seconds:.2f} s of CPU ({wall:.2f} s wall); max/mean cost {max(cost) / mean:.3f}; "
          f"memory max {max(memory) / cap:.1%} of the cap; {kinds}")
    assert max(cost) <= 1.2 * mean
    assert not math.isnan(mean) and mean > 0


def test_unpooled_collection_is_planned_with_the_default_sharders():
    ec = jr.EmbeddingCollection(tables=[jr.EmbeddingConfig(name="seq", num_embeddings=500_000, embedding_dim=12,
                                                           feature_names=["s"])], device="meta")
    topology = Topology(world_size=2, compute_device="cpu", ddr_cap=30 * 2 ** 20)  # 48 MB of weights and grads
    module_plan = EmbeddingShardingPlanner(topology).plan(ec).plan[""]
    assert module_plan["seq"].sharding_type in (CW, RW, TWRW)
    _assert_tiles(module_plan, ec.embedding_configs(), 2)
