"""Rank code for ``test_fp_sharding.py``: a model holding a FeatureProcessedEmbeddingBagCollection
under DistributedModelParallel, against the unsharded model on the global batch.

The reference is the same model unsharded, stepped on the ranks' batches side by side with
the loss averaged over ranks (what DDP's averaging makes of the dense parameters). The
comparison is within fp32 tolerance, not bit for bit: the sharded per-id weight gradient is
summed in another order (column shards add partial sums of a row's columns; a row-split
table's ids are regrouped per shard; DDP divides the processors' summed gradient by W where
the reference never multiplies by it)."""

from __future__ import annotations

import copy
from typing import List

import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.feature_processor_ import PositionWeightedModule, PositionWeightedModuleCollection
from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from jr_testing import assert_close, key_rows, random_configs
from sharding_cases import global_batch, plans, rank_batches


class _Model(torch.nn.Module):
    def __init__(self, fp_ebc, width: int) -> None:
        super().__init__()
        self.fp = fp_ebc
        self.head = torch.nn.Linear(width, 1)

    def forward(self, kjt):
        return self.head(self.fp(kjt).values()).squeeze(1)


def _fpebc(gen: torch.Generator, configs, form: str, fused, trainable: bool) -> FeatureProcessedEmbeddingBagCollection:
    keys = list(key_rows(configs))
    if form == "collection":
        processors = PositionWeightedModuleCollection({k: 8 for k in keys})
    else:
        processors = {k: PositionWeightedModule(max_feature_length=8) for k in keys}
    fp = FeatureProcessedEmbeddingBagCollection(jr.EmbeddingBagCollection(configs, is_weighted=True,
                                                                          fused_optimizer=fused), processors)
    with torch.no_grad():
        for n, p in fp.named_parameters():
            if "_feature_processors" in n:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # away from 1: a lost weight shows
                p.requires_grad_(trainable)
    return fp


def _processor_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if "_feature_processors" in k}


def dmp_case(rank: int, world: int, plan_name: str, form: str, fused_mode: str, trainable: bool = True,
             empty_rank: int = -1, steps: int = 3) -> str:
    """``steps`` SGD steps of the DMP model (plan ``plan_name``: "planner" for the default
    sharders' plan, else one of ``sharding_cases.plans``) equal the unsharded model's on the
    global batch: outputs every step; after, the dense head, the position weights and every
    table (through ``state_dict``, gathered where sharded). ``fused_mode``: "dense" (tables
    under torch.optim.SGD) or "sgd" (the fused SGD in the backward; the processors and head
    under torch.optim.SGD). Batches: a feature with no ids on every rank, empty bags, duplicate
    ids (tables of 3..40 rows), int32 ids on odd ranks, and a rank with no ids at all when
    ``empty_rank`` >= 0."""
    from jaggedrec.distributed.model_parallel import DistributedModelParallel
    from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan
    from jaggedrec.distributed.types import ShardingPlan

    gen = torch.Generator().manual_seed(4)
    configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32, mean_every=100, shared=False)
    rows = key_rows(configs)
    keys = list(rows)
    torch.manual_seed(6)
    fused = optim.SGD(0.3) if fused_mode == "sgd" else None
    width = sum(c.embedding_dim * len(c.feature_names) for c in configs)
    reference = _Model(_fpebc(gen, configs, form, fused, trainable), width)
    model = copy.deepcopy(reference)
    if plan_name == "planner":
        plan = None
    else:
        names, dims = [c.name for c in configs], [c.embedding_dim for c in configs]
        per_table = plans(world, names, dims)[plan_name]
        plan = ShardingPlan({"fp": construct_module_sharding_plan(model.fp, per_table, world_size=world,
                                                                  local_size=1 if world == 2 else world)})
    initial = {k: v.clone() for k, v in _processor_state(reference).items()}
    dmp = DistributedModelParallel(model, plan=plan)
    assert list(dmp.plan.plan) == ["fp"], dmp.plan.plan
    assert type(dmp.module.fp).__name__ == "ShardedFeatureProcessedEmbeddingBagCollection"

    def dense(m):
        return [p for n, p in m.named_parameters() if p.requires_grad and (fused is None or "embedding_bags" not in n)]

    ref_opt = torch.optim.SGD(dense(reference), lr=0.1)
    opt = torch.optim.SGD(dense(dmp), lr=0.1)
    for step in range(steps):
        batches = rank_batches(70 + step, world, rows, 4, weighted=False, empty_rank=empty_rank)
        gb = global_batch(batches, keys)
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys]))
        # the batches hold what the routing must keep apart: an id twice in a bag, empty bags
        assert any(len(set(ids.tolist())) < ids.numel() for ids in kjt.to_dict()["f1"].to_dense()), "no duplicates"
        assert bool((kjt.lengths() == 0).any())
        target = torch.randn(world * 4, generator=torch.Generator().manual_seed(step))
        expected = reference(kjt)
        out = dmp(batches[rank].kjt)
        assert_close(out, expected[rank * 4:(rank + 1) * 4].detach(), torch.float32, f"output, step {step}")
        ((expected - target) ** 2).view(world, 4).sum(1).mean().backward()
        ((out - target[rank * 4:(rank + 1) * 4]) ** 2).sum().backward()
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    assert_close(dmp.module.head.weight.detach(), reference.head.weight.detach(), torch.float32, "dense head")
    mine, theirs = _processor_state(dmp), _processor_state(reference)
    assert sorted(mine) == sorted(theirs), sorted(mine)
    for k in theirs:
        # trained, they moved (the reference's did; a frozen one stays)
        assert torch.equal(theirs[k], initial[k]) != trainable, k
        assert_close(mine[k], theirs[k], torch.float32, f"{k} after {steps} steps")
    _check_tables(dmp, reference, rank)
    if plan_name == "planner":  # an unsharded model's state loads: each rank takes its blocks
        other = _Model(_fpebc(torch.Generator().manual_seed(21), configs, form, fused, trainable), width)
        dmp.load_state_dict(other.state_dict())
        _check_tables(dmp, other, rank)
        for k, v in _processor_state(other).items():
            assert torch.equal(_processor_state(dmp)[k], v), k
    return f"{plan_name}/{form}/{fused_mode}"


def _check_tables(dmp, reference, rank: int) -> None:
    """Every table of the sharded model, loaded back into an unsharded copy, equals the reference's."""
    state = dmp.state_dict()
    ref_state = reference.state_dict()
    # TorchRec's keys (the fused optimizer's own state entries are left out: sharded, they
    # are per shard)
    ref_state = {k: v for k, v in ref_state.items() if "fused_optimizer" not in k}
    assert set(ref_state) <= set(state), sorted(set(ref_state) - set(state))
    for k, v in ref_state.items():
        if "embedding_bags" not in k:
            continue
        mine = state[k]
        if hasattr(mine, "local_shards"):
            for shard in mine.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                assert_close(shard.tensor.detach(), v[r0:r0 + nr, c0:c0 + nc].detach(), torch.float32,
                             f"{k} rows {r0}+{nr} cols {c0}+{nc}")
        else:
            assert_close(mine.detach(), v.detach(), torch.float32, k)


def dmp_cases(rank: int, world: int) -> List[str]:
    """The planner's plan and the hand plans (TW, RW, CW, DP, mixed), both processor forms,
    dense and fused table optimizers; on 3 ranks also a rank with no ids."""
    done = [dmp_case(rank, world, "planner", "collection", "dense")]
    for plan_name, form, fused_mode in (("mixed", "collection", "dense"), ("mixed", "dict", "sgd"),
                                        ("table_wise", "dict", "dense"), ("row_wise", "collection", "sgd"),
                                        ("column_wise", "collection", "dense"), ("data_parallel", "dict", "dense")):
        done.append(dmp_case(rank, world, plan_name, form, fused_mode))
    if world == 3:
        done.append(dmp_case(rank, world, "mixed", "collection", "sgd", empty_rank=1) + "/empty-rank")
    done.append(dmp_case(rank, world, "mixed", "collection", "dense", trainable=False) + "/frozen")
    return done


class _BatchModel(torch.nn.Module):
    """A train pipeline's model: ``(loss, (loss, logits))`` from a ``train_pipeline_cases.Batch``."""

    def __init__(self, fp_ebc, width: int) -> None:
        super().__init__()
        self.fp = fp_ebc
        self.head = torch.nn.Linear(width, 1)

    def forward(self, batch):
        logits = self.head(self.fp(batch.sparse_features).values()).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


def pipeline_case(rank: int, world: int, steps: int = 6, semi_sync: bool = False) -> dict:
    """TrainPipelineSparseDist over a DMP model with an FPEBC (mixed plan, fused SGD tables,
    trainable position weights) gives the plain loop's losses, logits and weights bit for bit.
    The feature processor changes the KJT before the sharded collection, so the dist the
    pipeline sent ahead for the batch's KJT is not taken: one counted fallback per step."""
    import warnings

    from jaggedrec.distributed.model_parallel import DistributedModelParallel
    from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan
    from jaggedrec.distributed.train_pipeline import TrainPipelineSemiSync, TrainPipelineSparseDist
    from jaggedrec.distributed.types import ShardingPlan
    from jr_testing import random_kjt, shuffled_keys
    from train_pipeline_cases import Batch, run_pipeline

    gen = torch.Generator().manual_seed(8)
    configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32, mean_every=100, shared=False)
    rows = key_rows(configs)
    width = sum(c.embedding_dim * len(c.feature_names) for c in configs)
    names, dims = [c.name for c in configs], [c.embedding_dim for c in configs]

    def build():
        torch.manual_seed(3)
        model = _BatchModel(_fpebc(torch.Generator().manual_seed(9), configs, "collection", optim.SGD(0.3), True),
                            width)
        plan = ShardingPlan({"fp": construct_module_sharding_plan(model.fp, plans(world, names, dims)["mixed"],
                                                                  world_size=world,
                                                                  local_size=1 if world == 2 else world)})
        dmp = DistributedModelParallel(model, plan=plan)
        return dmp, torch.optim.SGD([p for n, p in dmp.named_parameters() if "embedding_bags" not in n], lr=0.1)

    batches = []
    for step in range(steps):
        g = torch.Generator().manual_seed(500 * rank + step)
        keys = shuffled_keys(g, list(rows))
        kjt = random_kjt(g, keys, rows, 4, max_len=4, empty_keys=[keys[step % len(keys)]],
                         id_dtype=torch.int32 if rank % 2 else torch.int64).kjt
        batches.append(Batch(torch.zeros(4, 1), kjt, torch.randint(0, 2, (4,), generator=g).float()))
    ref, ref_opt = build()
    expected = []
    for batch in batches:
        ref_opt.zero_grad()
        loss, output = ref(batch)
        loss.backward()
        ref_opt.step()
        expected.append(output)
    dmp, opt = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pipe = (TrainPipelineSemiSync if semi_sync else TrainPipelineSparseDist)(dmp, opt, torch.device("cpu"))
        got = run_pipeline(pipe, batches)
    assert len(got) == steps
    for k, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1]), f"step {k}: loss {g[0]} != {e[0]}"
    # every local tensor: the shards' tables (fused-stepped), the processors, the head
    mine = dict(list(dmp.module.named_parameters()) + list(dmp.module.named_buffers()))
    theirs = dict(list(ref.module.named_parameters()) + list(ref.module.named_buffers()))
    assert mine.keys() == theirs.keys() and any("position_weights" in k for k in mine), sorted(mine)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    return pipe.fallbacks


def pipeline_cases(rank: int, world: int) -> list:
    """``pipeline_case`` for TrainPipelineSparseDist and TrainPipelineSemiSync (whose look-ahead
    of the batch's own KJT is not the processed one either: dropped, a counted fallback)."""
    return [pipeline_case(rank, world), pipeline_case(rank, world, semi_sync=True)]
