"""Test bodies that run on every rank of a gloo world (see ``distributed_harness.py``).

Every rank builds the same seeded module and the same W per-rank batches, so each can
compute the reference itself: the float64 loop of ``F.embedding_bag`` (``jr_testing``) over
the global batch (the ranks' batches, rank by rank), or, for training, the unsharded
module stepped on the global batch with the loss averaged over the ranks.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.comm import BatchRejected
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.sharding_plan import (column_wise, construct_module_sharding_plan, data_parallel,
                                                 row_wise, table_row_wise, table_wise)
from jaggedrec.distributed.types import ShardingEnv
from jr_testing import Batch, assert_close, key_rows, random_configs, random_kjt, reference_pooled, shuffled_keys


def run_cases(rank: int, world: int, calls) -> list:
    """Each ``(module, function, *args)`` of ``calls`` in turn, on this rank: its results."""
    import importlib
    return [getattr(importlib.import_module(module), name)(rank, world, *args) for module, name, *args in calls]


def plans(world: int, names: Sequence[str], dims: Sequence[int]) -> Dict[str, dict]:
    """Every sharding type for all tables, and a mixed plan."""
    local = 1 if world == 2 else world
    hosts = world // local
    out = {
        "table_wise": {n: table_wise(rank=(i + 1) % world) for i, n in enumerate(names)},
        "row_wise": {n: row_wise() for n in names},
        "column_wise": {n: column_wise(ranks=[(i + j) % world for j in range(min(d, world + 1))])
                        for i, (n, d) in enumerate(zip(names, dims))},
        "table_row_wise": {n: table_row_wise(host_index=i % hosts) for i, n in enumerate(names)},
        "data_parallel": {n: data_parallel() for n in names},
    }
    kinds = [table_wise(rank=world - 1), row_wise(), column_wise(ranks=[1, 0]), table_row_wise(host_index=0),
             data_parallel()]
    out["mixed"] = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    out["_local_size"] = local
    return out


def global_batch(batches: List[Batch], keys: Sequence[str]) -> Batch:
    """The ranks' batches as one, rank by rank within each feature."""
    per_key = {}
    for k in keys:
        values = torch.cat([b.per_key[k][0] for b in batches])
        lengths = torch.cat([b.per_key[k][1] for b in batches])
        weights = None if batches[0].per_key[k][2] is None else torch.cat([b.per_key[k][2] for b in batches])
        per_key[k] = (values, lengths, weights)
    return Batch(None, per_key)


def rank_batches(seed: int, world: int, rows: Dict[str, int], batch: int, weighted: bool,
                 empty_rank: int = -1) -> List[Batch]:
    """W batches, each with its own key order, int32 ids on odd ranks; rank ``empty_rank`` gets
    no ids at all, and on every rank one feature has none."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        keys = shuffled_keys(gen, list(rows))
        empty = list(rows) if r == empty_rank else [keys[r % len(keys)]]
        out.append(random_kjt(gen, keys, rows, batch, max_len=4, weighted=weighted, empty_keys=empty,
                              id_dtype=torch.int32 if r % 2 else torch.int64))
    return out


def planner_plan(ebc, world: int, local_size: int):
    """The planner's plan for ``ebc`` under caps tight enough that it splits tables."""
    from jaggedrec.distributed.planner import EmbeddingShardingPlanner, Topology
    sizes = [c.num_embeddings * c.embedding_dim * 2 * c.data_type.to_torch().itemsize
             for c in ebc.embedding_bag_configs()]
    cap = int(max(0.6 * max(sizes), 1.3 * sum(sizes) / world))
    topology = Topology(world_size=world, local_world_size=local_size, compute_device="cpu", ddr_cap=cap)
    plan = EmbeddingShardingPlanner(topology).collective_plan(ebc, pg=dist.group.WORLD).plan[""]
    assert any(len(sharding.shards) > 1 for sharding in plan.values()), plan
    return plan


def sharded(ebc, per_table, world, local_size, fused_params=None):
    """``per_table``: a generator per table, or a module plan."""
    plan = (per_table if not callable(next(iter(per_table.values())))
            else construct_module_sharding_plan(ebc, per_table, world_size=world, local_size=local_size))
    return EmbeddingBagCollectionSharder(fused_params).shard(ebc, plan, ShardingEnv.from_process_group(
        dist.group.WORLD), torch.device("cpu"))


def forward_cases(rank: int, world: int) -> List[str]:
    """Every plan, weighted or not, fp32 and fp16 tables, two steps of different batch sizes."""
    checked = []
    for weighted in (False, True):
        for data_type in (jr.DataType.FP32, jr.DataType.FP16):
            gen = torch.Generator().manual_seed(7)
            # fp32: odd dims; fp16: even ones, whose output columns move in blocks wider than one
            dims = (4, 3, 5, 1, 6) if data_type == jr.DataType.FP32 else (4, 8, 4, 12, 8)
            configs = random_configs(gen, dims, data_type)
            torch.manual_seed(3)
            ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted)
            rows = key_rows(configs)
            names, dims = [c.name for c in configs], [c.embedding_dim for c in configs]
            all_plans = plans(world, names, dims)
            local = all_plans.pop("_local_size")
            all_plans["planner"] = planner_plan(ebc, world, local)
            for plan_name, per_table in all_plans.items():
                if data_type == jr.DataType.FP16 and plan_name not in ("mixed", "row_wise", "planner"):
                    continue
                module = sharded(ebc, per_table, world, local)
                for step, batch in enumerate((3, 5)):
                    batches = rank_batches(100 * step + world, world, rows, batch, weighted,
                                           empty_rank=1 if step else -1)
                    ref = reference_pooled(ebc, global_batch(batches, list(rows)))
                    out = module(batches[rank].kjt).wait()
                    assert out.keys() == ebc(batches[rank].kjt).keys()
                    assert_close(out.values(), ref[rank * batch:(rank + 1) * batch],
                                 {jr.DataType.FP32: torch.float32, jr.DataType.FP16: torch.float16}[data_type],
                                 f"{plan_name} weighted={weighted} {data_type} step {step}")
                checked.append(f"{plan_name}/{weighted}/{data_type.value}")
    return checked


TRAIN_MODES = ("dense", "sparse", "sgd", "rowwise_adagrad", "adam")


def _fused(mode: str):
    return {"sgd": optim.SGD(0.3), "rowwise_adagrad": optim.RowWiseAdagrad(0.2, eps=1e-3),
            "adam": optim.Adam(0.05), "adagrad": optim.Adagrad(0.2, eps=1e-3),
            "lars_sgd": optim.LarsSGD(0.3, eta=0.5, weight_decay=0.01),
            "partial_rowwise_adam": optim.PartialRowWiseAdam(0.05, weight_decay=0.01),
            "lamb": optim.LAMB(0.05, weight_decay=0.01), "partial_rowwise_lamb": optim.PartialRowWiseLAMB(0.05)}.get(mode)


def train_cases(rank: int, world: int, modes: Sequence[str] = TRAIN_MODES) -> List[str]:
    """Three steps of each mode on the mixed plan: every shard's weights equal the unsharded
    module's after the same steps on the global batch, with the loss averaged over ranks."""
    checked = []
    for mode in modes:
        gen = torch.Generator().manual_seed(11)
        configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32)
        names, dims = [c.name for c in configs], [c.embedding_dim for c in configs]
        per_table = plans(world, names, dims)["mixed"]
        if _fused(mode) is not None and _fused(mode).needs_whole_rows:  # CW is refused (see shards.check_fused)
            per_table = {n: (table_wise(rank=0) if i % 5 == 2 else g) for i, (n, g) in enumerate(per_table.items())}
        kwargs = dict(is_weighted=True, sparse=mode == "sparse", fused_optimizer=_fused(mode))
        torch.manual_seed(5)
        reference = jr.EmbeddingBagCollection(configs, **kwargs)
        module = sharded(reference, per_table, world, 1 if world == 2 else world)
        ref_opt = sgd = None
        if mode in ("dense", "sparse"):
            ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
            sgd = torch.optim.SGD(module.parameters(), lr=0.5)
        rows = key_rows(configs)
        for step in range(3):
            batch = 4
            batches = rank_batches(50 + step, world, rows, batch, weighted=True)
            gb = global_batch(batches, list(rows))
            keys = list(rows)
            kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                       torch.cat([gb.per_key[k][2] for k in keys]),
                                       lengths=torch.cat([gb.per_key[k][1] for k in keys]))
            tgen = torch.Generator().manual_seed(900 + step)
            targets = torch.randn(world * batch, sum(c.embedding_dim * len(c.feature_names) for c in configs),
                                  generator=tgen)
            ref_out = reference(kjt).values()
            (ref_out * targets).view(world, batch, -1).sum((1, 2)).mean().backward()
            out = module(batches[rank].kjt)
            (out.values() * targets[rank * batch:(rank + 1) * batch]).sum().backward()
            step_optimizers(ref_opt, sgd)
        assert_shards_match(module, reference, rank, f"{mode}, after 3 steps")
        checked.append(mode)
    return checked


def step_optimizers(*optimizers) -> None:
    for opt in optimizers:
        if opt is not None:
            opt.step()
            opt.zero_grad()


def assert_shards_match(module, reference, rank: int, what: str) -> None:
    """Every local shard of the sharded ``module`` equals its block of ``reference``'s table."""
    local = module.local_collection()
    for i, s in enumerate(module._layout.shards[rank]):
        expected = reference.table_weight(s.table)[s.row_offset:s.row_offset + s.rows,
                                                   s.col_offset:s.col_offset + s.cols]
        assert_close(local.table_weight(i).detach(), expected.detach(), torch.float32, f"{what}: shard {s.local_name}")


def bad_input_cases(rank: int, world: int) -> List[str]:
    """A bad batch on one rank raises there, naming the feature, and on every other rank a
    BatchRejected carrying that message; nobody hangs, and the next good step works."""
    gen = torch.Generator().manual_seed(2)
    configs = random_configs(gen, (4, 3, 5), jr.DataType.FP32)
    torch.manual_seed(1)
    ebc = jr.EmbeddingBagCollection(configs)
    names, dims = [c.name for c in configs], [c.embedding_dim for c in configs]
    module = sharded(ebc, plans(world, names, dims)["mixed"], world, 1 if world == 2 else world)
    rows = key_rows(configs)
    seen = []

    def expect(batches, bad_rank, words):
        try:
            module(batches[rank].kjt).wait()
        except BatchRejected as e:
            assert rank != bad_rank and f"rank {bad_rank}" in str(e), str(e)
            assert all(w in str(e) for w in words), str(e)
            seen.append("rejected")
            return
        except ValueError as e:
            assert rank == bad_rank or bad_rank < 0, str(e)
            assert all(w in str(e) for w in words), str(e)
            seen.append("raised")
            return
        raise AssertionError(f"rank {rank}: the bad batch was accepted")

    good = rank_batches(1, world, rows, 3, weighted=False)
    # an id past its table on the last rank
    bad = rank_batches(1, world, rows, 3, weighted=False)
    keys = list(rows)
    values = bad[-1].kjt.values().clone()
    values[-1] = 10_000
    kjt = bad[-1].kjt
    bad[-1].kjt = jr.KeyedJaggedTensor(kjt.keys(), values, lengths=kjt.lengths())
    last_key = [k for k, n in zip(kjt.keys(), kjt.length_per_key()) if n][-1]
    expect(bad, world - 1, ["10000", last_key])
    # a feature missing on rank 0
    missing = rank_batches(1, world, rows, 3, weighted=False)
    k0 = missing[0].kjt
    drop = keys[0]
    keep = [k for k in k0.keys() if k != drop]
    missing[0].kjt = jr.KeyedJaggedTensor.from_jt_dict({k: k0[k] for k in keep})
    expect(missing, 0, [drop])
    # batch sizes that differ across ranks: every rank raises
    sizes = [rank_batches(1, world, rows, 3 + (r == 1), weighted=False)[r] for r in range(world)]
    expect(sizes, -1, ["same batch size"])
    # the next good step is served
    out = module(good[rank].kjt).wait()
    ref = reference_pooled(ebc, global_batch(good, keys))
    assert_close(out.values(), ref[rank * 3:(rank + 1) * 3], torch.float32, "after the bad steps")
    return seen


class _Ranker(torch.nn.Module):
    """A model that reads the collection's output as a KeyedTensor, never calling wait()."""

    def __init__(self, ebc, width: int) -> None:
        super().__init__()
        self.sparse = torch.nn.ModuleDict({"ebc": ebc})
        torch.manual_seed(8)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, kjt):
        kt = self.sparse["ebc"](kjt)
        first = kt[kt.keys()[0]]
        return self.head(kt.values()).squeeze(1) + first.sum(1)


def dmp_cases(rank: int, world: int) -> List[str]:
    """DistributedModelParallel over a model with dense layers, by a hand plan and by the
    planner's own (``plan=None``): three SGD steps equal the unsharded model's on the global
    batch (loss averaged over ranks), dense and embedding weights alike."""
    return [_dmp_case(rank, world, hand_plan) for hand_plan in (True, False)]


def _dmp_case(rank: int, world: int, hand_plan: bool) -> str:
    from jaggedrec.distributed.model_parallel import DistributedModelParallel
    from jaggedrec.distributed.types import ShardingPlan
    import copy
    gen = torch.Generator().manual_seed(4)
    configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32)
    torch.manual_seed(6)
    width = sum(c.embedding_dim * len(c.feature_names) for c in configs)
    reference = _Ranker(jr.EmbeddingBagCollection(configs, is_weighted=True), width)
    model = copy.deepcopy(reference)
    names, dims = [c.name for c in configs], [c.embedding_dim for c in configs]
    plan = ShardingPlan({"sparse.ebc": construct_module_sharding_plan(
        model.sparse["ebc"], plans(world, names, dims)["mixed"], world_size=world,
        local_size=1 if world == 2 else world)}) if hand_plan else None
    dmp = DistributedModelParallel(model, plan=plan)
    assert list(dmp.plan.plan) == ["sparse.ebc"]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(dmp.parameters(), lr=0.1)
    rows = key_rows(configs)
    keys = list(rows)
    for step in range(3):
        batches = rank_batches(70 + step, world, rows, 4, weighted=True)
        gb = global_batch(batches, keys)
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   torch.cat([gb.per_key[k][2] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys]))
        target = torch.randn(world * 4, generator=torch.Generator().manual_seed(step))
        loss = ((reference(kjt) - target) ** 2).view(world, 4).sum(1).mean()
        loss.backward()
        mine = ((dmp(batches[rank].kjt) - target[rank * 4:(rank + 1) * 4]) ** 2).sum()
        mine.backward()
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    assert_close(dmp.module.head.weight.detach(), reference.head.weight.detach(), torch.float32, "dense head")
    sharded_ebc = dmp.module.sparse["ebc"]
    local = sharded_ebc.local_collection()
    for i, s in enumerate(sharded_ebc._layout.shards[rank]):
        expected = reference.sparse["ebc"].table_weight(s.table)[s.row_offset:s.row_offset + s.rows,
                                                                  s.col_offset:s.col_offset + s.cols]
        assert_close(local.table_weight(i).detach(), expected.detach(), torch.float32, f"shard {s.local_name}")
    # TorchRec's keys; an unsharded model's state (plain tensors) loads: each rank takes its blocks
    state = dmp.state_dict()
    assert sorted(state) == sorted(reference.state_dict()), sorted(state)
    torch.manual_seed(17)
    other = _Ranker(jr.EmbeddingBagCollection(configs, is_weighted=True), width)
    dmp.load_state_dict(other.state_dict())
    for i, s in enumerate(sharded_ebc._layout.shards[rank]):
        expected = other.sparse["ebc"].table_weight(s.table)[s.row_offset:s.row_offset + s.rows,
                                                              s.col_offset:s.col_offset + s.cols]
        assert torch.equal(local.table_weight(i).detach(), expected.detach()), s.local_name
    assert torch.equal(dmp.module.head.weight.detach(), other.head.weight.detach())
    return "dmp/hand" if hand_plan else "dmp/planner"


def cuda_cases(rank: int, world: int) -> List[str]:
    """On CUDA over NCCL (the Triton kernels serve the local collection): every sharding type
    in one plan, the forward against the float64 loop, and two fused-SGD steps against the
    unsharded module on the global batch."""
    device = torch.device("cuda", rank)
    gen = torch.Generator().manual_seed(12)
    configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32)
    names = [c.name for c in configs]
    kinds = [table_wise(rank=0), row_wise(), column_wise(ranks=[0] * min(2, world + 1)), table_row_wise(host_index=0),
             data_parallel()]
    per_table = {n: kinds[i] for i, n in enumerate(names)}
    torch.manual_seed(2)
    reference = jr.EmbeddingBagCollection(configs, is_weighted=True, device=device, fused_optimizer=optim.SGD(0.2))
    plan = construct_module_sharding_plan(reference, per_table, world_size=world, local_size=world, device_type="cuda")
    module = EmbeddingBagCollectionSharder().shard(reference, plan, ShardingEnv.from_process_group(dist.group.WORLD),
                                                   device)
    rows = key_rows(configs)
    keys = list(rows)
    for step in range(2):
        batches = rank_batches(30 + step, world, rows, 6, weighted=True)
        gb = global_batch(batches, keys)
        tables64 = [reference.embedding_bags[c.name].weight.detach().cpu().double() for c in configs]
        expected = reference_pooled(reference, gb, tables64)[rank * 6:(rank + 1) * 6]
        out = module(batches[rank].kjt.to(device)).values()
        assert_close(out.cpu(), expected, torch.float32, f"cuda forward, step {step}")
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   torch.cat([gb.per_key[k][2] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys])).to(device)
        reference(kjt).values().view(world, 6, -1).sum((1, 2)).mean().backward()
        out.sum().backward()
    local = module.local_collection()
    for i, s in enumerate(module._layout.shards[rank]):
        expected = reference.table_weight(s.table)[s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols]
        assert_close(local.table_weight(i).detach().cpu(), expected.detach().cpu(), torch.float32,
                     f"cuda shard {s.local_name}")
    return ["cuda"]
