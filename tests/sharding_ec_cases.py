"""The sharded EmbeddingCollection on every rank of a gloo world (see ``distributed_harness.py``),
against a float64 ``table[ids]`` lookup of the global batch and, for training, the unsharded
module stepped on the global batch with the loss averaged over the ranks."""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.comm import BatchRejected
from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
from jaggedrec.distributed.model_parallel import DistributedModelParallel
from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from jaggedrec.distributed.types import ShardingEnv
from jr_testing import assert_close, key_rows, random_configs
from sharding_cases import assert_shards_match, global_batch, plans, rank_batches, step_optimizers

BATCH = 3


def _configs(data_type=jr.DataType.FP32) -> List[jr.EmbeddingConfig]:
    """Mixed dims (odd ones too) and a feature read by two tables."""
    gen = torch.Generator().manual_seed(31)
    return [jr.EmbeddingConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                               feature_names=list(c.feature_names), data_type=data_type if i % 2 else jr.DataType.FP32)
            for i, c in enumerate(random_configs(gen, (4, 3, 5, 2, 6)))]


def _shard(ec, per_table, world, fused_params=None):
    plan = construct_module_sharding_plan(ec, per_table, world_size=world, local_size=1 if world == 2 else world)
    return EmbeddingCollectionSharder(fused_params).shard(ec, plan, ShardingEnv.from_process_group(dist.group.WORLD),
                                                          torch.device("cpu"))


def _own_rows(ec, batches, rank: int) -> Dict[str, torch.Tensor]:
    """Per output feature, float64 ``table[ids]`` of rank ``rank``'s samples of the global batch."""
    keys = list(key_rows(ec.embedding_configs()))
    gb = global_batch(batches, keys)
    out = {}
    names = iter(ec._embedding_names)
    for t, c in enumerate(ec.embedding_configs()):
        table = ec.table_weight(t).detach().double()
        for key in c.feature_names:
            values, lengths, _ = gb.per_key[key]
            first = int(lengths[:rank * BATCH].sum())
            count = int(lengths[rank * BATCH:(rank + 1) * BATCH].sum())
            out[next(names)] = table[values[first:first + count].long()]
    return out


def ec_forward_cases(rank: int, world: int) -> List[str]:
    """Every plan and a mixed one, fp32 and fp16 tables, ids as indices, two steps."""
    checked = []
    for data_type in (jr.DataType.FP32, jr.DataType.FP16):
        configs = _configs(data_type)
        torch.manual_seed(3)
        ec = jr.EmbeddingCollection(configs, need_indices=data_type == jr.DataType.FP16)
        rows = key_rows(configs)
        all_plans = plans(world, [c.name for c in configs], [c.embedding_dim for c in configs])
        all_plans.pop("_local_size")
        for plan_name, per_table in all_plans.items():
            module = _shard(ec, per_table, world)
            for step in range(2):
                batches = rank_batches(40 + step, world, rows, BATCH, weighted=False, empty_rank=1 if step else -1)
                out = module(batches[rank].kjt).wait()
                mine = ec(batches[rank].kjt)
                assert list(out) == list(mine)
                expected = _own_rows(ec, batches, rank)
                for name, jt in out.items():
                    what = f"{plan_name} {data_type} step {step} {name}"
                    assert jt.values().dtype == mine[name].values().dtype, what
                    assert torch.equal(jt.lengths(), mine[name].lengths()), what
                    assert_close(jt.values().float(), expected[name], jt.values().dtype, what)
                    if ec.need_indices():
                        assert torch.equal(jt.weights().long(), mine[name].weights().long()), what
            checked.append(f"{plan_name}/{data_type.value}")
    _bad_id_on_last_rank(module, rows, rank, world)
    return checked


def _bad_id_on_last_rank(module, rows, rank: int, world: int) -> None:
    """An id past its table on the last rank: a ValueError naming the feature there, the
    other ranks a BatchRejected with that message, nobody waiting."""
    batches = rank_batches(90, world, rows, BATCH, weighted=False)
    kjt = batches[-1].kjt
    values = kjt.values().clone()
    values[-1] = 10_000
    key = [k for k, n in zip(kjt.keys(), kjt.length_per_key()) if n][-1]
    batches[-1].kjt = jr.KeyedJaggedTensor(kjt.keys(), values, lengths=kjt.lengths())
    try:
        module(batches[rank].kjt).wait()
    except BatchRejected as e:
        assert rank != world - 1 and f"rank {world - 1}" in str(e) and key in str(e), str(e)
    except ValueError as e:
        assert rank == world - 1 and "10000" in str(e) and key in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: the bad batch was accepted")


TRAIN_MODES = ("dense", "sgd", "rowwise_adagrad", "adam")


def ec_train_cases(rank: int, world: int) -> List[str]:
    """Three steps on the mixed plan; each shard equals the unsharded module's block after
    the same steps on the global batch."""
    checked = []
    for mode in TRAIN_MODES:
        configs = _configs()
        names = [c.name for c in configs]
        per_table = plans(world, names, [c.embedding_dim for c in configs])["mixed"]
        if mode == "rowwise_adagrad":  # row state needs whole rows
            per_table = {n: (table_wise(rank=0) if i % 5 == 2 else g) for i, (n, g) in enumerate(per_table.items())}
        fused = {"sgd": optim.SGD(0.3), "rowwise_adagrad": optim.RowWiseAdagrad(0.2, eps=1e-3),
                 "adam": optim.Adam(0.05)}.get(mode)
        torch.manual_seed(5)
        reference = jr.EmbeddingCollection(configs, fused_optimizer=fused)
        module = _shard(reference, per_table, world)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5) if mode == "dense" else None
        opt = torch.optim.SGD(module.parameters(), lr=0.5) if mode == "dense" else None
        rows = key_rows(configs)
        keys = list(rows)
        for step in range(3):
            batches = rank_batches(60 + step, world, rows, BATCH, weighted=False)
            gb = global_batch(batches, keys)
            kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                       lengths=torch.cat([gb.per_key[k][1] for k in keys]))
            ref_out = reference(kjt)
            loss = 0.0
            mine = 0.0
            out = module(batches[rank].kjt)
            for i, (name, jt) in enumerate(ref_out.items()):
                # a fixed weight per sample and column: the loss is a sum over the samples
                g = torch.Generator().manual_seed(1000 * step + i)
                per_sample = torch.randn(world * BATCH, jt.values().shape[1], generator=g)
                sample = torch.repeat_interleave(torch.arange(world * BATCH), jt.lengths())
                rank_of = sample // BATCH
                loss = loss + torch.stack([(jt.values() * per_sample[sample])[rank_of == r].sum()
                                           for r in range(world)]).mean()
                own = out[name]
                own_sample = torch.repeat_interleave(torch.arange(BATCH), own.lengths()) + rank * BATCH
                mine = mine + (own.values() * per_sample[own_sample]).sum()
            loss.backward()
            mine.backward()
            step_optimizers(ref_opt, opt)
        assert_shards_match(module, reference, rank, f"{mode}, after 3 steps")
        checked.append(mode)
    return checked


class _Lookup(torch.nn.Module):
    def __init__(self, ec) -> None:
        super().__init__()
        self.ec = ec

    def forward(self, kjt):
        return self.ec(kjt)


def ec_dmp_checkpoint_cases(rank: int, world: int, directory: str) -> List[str]:
    """DistributedModelParallel shards an EmbeddingCollection with the default sharders and the
    planner; its state_dict (TorchRec's ``embeddings.<t>.weight``) saved by dcp on one plan
    loads into another."""
    configs = _configs()
    torch.manual_seed(9)
    reference = jr.EmbeddingCollection(configs)
    model = _Lookup(jr.EmbeddingCollection(configs))
    model.ec.load_state_dict(reference.state_dict())
    dmp = DistributedModelParallel(model, device=torch.device("cpu"))
    assert type(dmp.module.ec).__name__ == "ShardedEmbeddingCollection"
    rows = key_rows(configs)
    batches = rank_batches(80, world, rows, BATCH, weighted=False)
    expected = _own_rows(reference, batches, rank)
    out = dmp(batches[rank].kjt)
    for name in expected:
        assert_close(out[name].values(), expected[name], torch.float32, f"dmp {name}")
    state = dmp.state_dict()
    assert sorted(state) == sorted(f"ec.embeddings.{c.name}.weight" for c in configs), sorted(state)
    path = os.path.join(directory, "ec")
    dcp.save(state, checkpoint_id=path)
    names = [c.name for c in configs]
    torch.manual_seed(10)
    other = torch.nn.ModuleDict({"ec": _shard(jr.EmbeddingCollection(configs), plans(
        world, names, [c.embedding_dim for c in configs])["row_wise"], world)})
    loaded = other.state_dict()
    dcp.load(loaded, checkpoint_id=path)
    other.load_state_dict(loaded)
    out = other["ec"](batches[rank].kjt).wait()
    for name in expected:
        assert_close(out[name].values(), expected[name], torch.float32, f"after dcp.load {name}")
    return ["ec/dmp+dcp"]
