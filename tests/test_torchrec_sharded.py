"""TorchRec's own objects at the sharded boundaries, on 2 gloo ranks (one launch; skipped
without TorchRec): real ``torchrec.KeyedJaggedTensor`` batches fed to the sharded bag and
sequence collections and to a ``DistributedModelParallel`` model, which an in-backward
``RowWiseAdagrad`` (``jaggedrec.optim.rowwise_adagrad``) fuses and whose dense part a
``KeyedOptimizerWrapper`` over ``in_backward_optimizer_filter`` steps, and whose state is
gathered to one process (``jaggedrec.inference.state_dict_transform``), as TorchRec's examples
do. References: float64 loops over the global batch, and the unsharded model stepped on it."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch

import jaggedrec as jr
from distributed_harness import run_ranks
from jr_testing import assert_close, key_rows, random_configs, reference_pooled


def _theirs(batch):
    """TorchRec's KJT of a test batch: the same keys and tensors."""
    import torchrec
    kjt = batch.kjt
    return torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values(), kjt.weights_or_none(), lengths=kjt.lengths())


def bag_cases(rank: int, world: int) -> List[str]:
    """Every plan kind at once (the mixed plan), weighted: TorchRec's KJT pools as the float64
    loop over the global batch and gives the same output and table gradients as jaggedrec's."""
    from sharding_cases import global_batch, plans, rank_batches, sharded
    gen = torch.Generator().manual_seed(21)
    configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32)
    torch.manual_seed(2)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True)
    rows = key_rows(configs)
    module = sharded(ebc, plans(world, [c.name for c in configs], [c.embedding_dim for c in configs])["mixed"],
                     world, 1)
    for step, batch in enumerate((3, 4)):
        batches = rank_batches(200 + step, world, rows, batch, weighted=True, empty_rank=1 if step else -1)
        ref = reference_pooled(ebc, global_batch(batches, list(rows)))[rank * batch:(rank + 1) * batch]
        theirs = module(_theirs(batches[rank])).wait()
        assert_close(theirs.values(), ref, torch.float32, f"torchrec KJT, step {step}")
        ours = module(batches[rank].kjt).wait()
        assert theirs.keys() == ours.keys()
        assert torch.equal(theirs.values(), ours.values())
    return ["bags"]


def sequence_cases(rank: int, world: int) -> List[str]:
    """The sharded EmbeddingCollection takes TorchRec's KJT: each feature's rows are the float64
    table rows of this rank's ids."""
    from sharding_cases import plans, rank_batches
    from sharding_ec_cases import BATCH, _configs, _own_rows, _shard
    configs = _configs()
    torch.manual_seed(3)
    ec = jr.EmbeddingCollection(configs)
    rows = key_rows(configs)
    module = _shard(ec, plans(world, [c.name for c in configs], [c.embedding_dim for c in configs])["mixed"], world)
    batches = rank_batches(60, world, rows, BATCH, weighted=False)
    out = module(_theirs(batches[rank])).wait()
    expected = _own_rows(ec, batches, rank)
    assert list(out) == list(expected)
    for name, jt in out.items():
        assert_close(jt.values(), expected[name], torch.float32, f"sequence {name}")
    return ["sequences"]


class _Model(torch.nn.Module):
    def __init__(self, ebc, width: int) -> None:
        super().__init__()
        self.sparse_arch = torch.nn.ModuleDict({"ebc": ebc})
        torch.manual_seed(8)
        self.over = torch.nn.Linear(width, 1)

    def forward(self, kjt):
        return self.over(self.sparse_arch["ebc"](kjt).values()).squeeze(1)


def dmp_cases(rank: int, world: int) -> List[str]:
    """TorchRec's golden-training recipe: RowWiseAdagrad applied in the backward to the
    collection, DMP with the planner's plan, a KeyedOptimizerWrapper over the parameters
    in_backward_optimizer_filter leaves, TorchRec KJTs in. Three steps equal the unsharded
    model's (fused row-wise Adagrad, dense SGD) on the global batch, loss averaged over ranks."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    from jaggedrec import optim
    from jaggedrec.distributed import DistributedModelParallel
    from jaggedrec.optim.keyed import KeyedOptimizerWrapper
    from jaggedrec.optim.optimizers import in_backward_optimizer_filter
    from jaggedrec.optim.rowwise_adagrad import RowWiseAdagrad
    from sharding_cases import global_batch, rank_batches
    gen = torch.Generator().manual_seed(4)
    configs = random_configs(gen, (4, 3, 5), jr.DataType.FP32)
    width = sum(c.embedding_dim * len(c.feature_names) for c in configs)
    torch.manual_seed(6)
    model = _Model(jr.EmbeddingBagCollection(configs, is_weighted=True), width)
    reference = _Model(jr.EmbeddingBagCollection(configs, is_weighted=True,
                                                 fused_optimizer=optim.RowWiseAdagrad(0.1, eps=1e-3)), width)
    missing, unexpected = reference.load_state_dict(copy.deepcopy(model.state_dict()), strict=False)
    assert not unexpected and all(".fused_optimizer_state." in k for k in missing), (missing, unexpected)
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.1, "eps": 1e-3})
    dmp = DistributedModelParallel(model)
    seen = []
    dmp.module.register_forward_pre_hook(lambda module, args: seen.append(type(args[0])))
    sharded_ebc = dmp.module.sparse_arch["ebc"]
    assert sharded_ebc.fused_optimizer == optim.RowWiseAdagrad(0.1, eps=1e-3)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=0.2))
    assert sorted(dense.params) == ["over.bias", "over.weight"]
    ref_dense = torch.optim.SGD(reference.over.parameters(), lr=0.2)
    rows, keys = key_rows(configs), list(key_rows(configs))
    for step in range(3):
        batches = rank_batches(90 + step, world, rows, 4, weighted=True)
        gb = global_batch(batches, keys)
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   torch.cat([gb.per_key[k][2] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys]))
        target = torch.randn(world * 4, generator=torch.Generator().manual_seed(step))
        ((reference(kjt) - target) ** 2).view(world, 4).sum(1).mean().backward()
        ((dmp(_theirs(batches[rank])) - target[rank * 4:(rank + 1) * 4]) ** 2).sum().backward()
        for o in (dense, ref_dense):
            o.step()
            o.zero_grad()
    assert seen == [jr.KeyedJaggedTensor] * 3  # DMP hands the model jaggedrec's KJT
    assert_close(dmp.module.over.weight.detach(), reference.over.weight.detach(), torch.float32, "dense layer")
    state = dmp.state_dict()
    for name, value in reference.state_dict().items():
        if name.startswith("sparse_arch") and name.endswith(".weight"):
            held = state[name]
            mine = ({tuple(s.metadata.shard_offsets): s.tensor for s in held.local_shards()}
                    if hasattr(held, "local_shards") else {(0, 0): held})
            for offsets, tensor in mine.items():
                block = value[offsets[0]:offsets[0] + tensor.shape[0], offsets[1]:offsets[1] + tensor.shape[1]]
                assert_close(tensor, block, torch.float32, f"{name} at {offsets}")
    # the retrieval example's way to one process: state to CPU, gathered whole on rank 0
    import torch.distributed as dist

    from jaggedrec.inference.state_dict_transform import state_dict_gather, state_dict_to_device
    on_cpu = state_dict_to_device(dmp.state_dict(), dist.group.WORLD, torch.device("cpu"))
    whole = _Model(jr.EmbeddingBagCollection(configs, is_weighted=True,
                                             device=torch.device("cpu" if rank == 0 else "meta")), width)
    state_dict_gather(on_cpu, whole.state_dict())
    if rank == 0:
        for t in range(len(configs)):
            assert_close(whole.sparse_arch["ebc"].table_weight(t).detach(),
                         reference.sparse_arch["ebc"].table_weight(t).detach(), torch.float32, f"gathered table {t}")
        assert torch.equal(whole.over.weight, dmp.module.over.weight)
    return ["dmp"]


def test_torchrec_objects_on_two_gloo_ranks():
    pytest.importorskip("torchrec")
    import sharding_cases
    calls = [("test_torchrec_sharded", name) for name in ("bag_cases", "sequence_cases", "dmp_cases")]
    results = run_ranks(sharding_cases.run_cases, 2, calls, timeout=420)
    assert results == [[["bags"], ["sequences"], ["dmp"]]] * 2
