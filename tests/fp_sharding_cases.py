"""Rank code for ``test_fp_sharding.py``: a model holding a FeatureProcessedEmbeddingBagCollection
under DistributedModelParallel, against the unsharded model on the global batch."""

from __future__ import annotations

import copy

import torch

import jaggedrec as jr
from jaggedrec.modules.feature_processor_ import PositionWeightedModuleCollection
from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from jr_testing import assert_close, key_rows, random_configs
from sharding_cases import global_batch, rank_batches


class _Model(torch.nn.Module):
    def __init__(self, fp_ebc, width: int) -> None:
        super().__init__()
        self.fp = fp_ebc
        self.head = torch.nn.Linear(width, 1)

    def forward(self, kjt):
        return self.head(self.fp(kjt).values()).squeeze(1)


def dmp_fpebc(rank: int, world: int) -> str:
    """Three SGD steps of the planner-sharded model (its FPEBC's inner collection sharded) equal
    the unsharded model's on the global batch (loss averaged over ranks): outputs and head.

    The position weights are frozen here: the sharded collection's input distribution does not
    carry a gradient back to the per-id weights it sends, so under DMP they would get none (DDP
    then reports them unused). Training them sharded needs that gradient (not done yet)."""
    from jaggedrec.distributed.model_parallel import DistributedModelParallel

    gen = torch.Generator().manual_seed(4)
    configs = random_configs(gen, (4, 3, 5), jr.DataType.FP32, mean_every=100, shared=False)
    rows = key_rows(configs)
    keys = list(rows)
    torch.manual_seed(6)
    width = sum(c.embedding_dim * len(c.feature_names) for c in configs)
    processors = PositionWeightedModuleCollection({k: 8 for k in keys})
    with torch.no_grad():
        for p in processors.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            p.requires_grad_(False)
    reference = _Model(FeatureProcessedEmbeddingBagCollection(jr.EmbeddingBagCollection(configs, is_weighted=True),
                                                              processors), width)
    model = copy.deepcopy(reference)
    dmp = DistributedModelParallel(model)
    assert list(dmp.plan.plan) == ["fp._embedding_bag_collection"], dmp.plan.plan
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(dmp.parameters(), lr=0.1)
    for step in range(3):
        batches = rank_batches(70 + step, world, rows, 4, weighted=True)
        gb = global_batch(batches, keys)
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys]))
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
    return "ok"
