"""ManagedCollisionEmbeddingBagCollection / ...EmbeddingCollection over jaggedrec's collections:
with room for every distinct id and no eviction pending, the output is the static collection's
on the remapped ids, bit for bit, and each (table, id) keeps one row of its own."""

from __future__ import annotations

from typing import Dict

import pytest
import torch

import jaggedrec as jr
from jaggedrec.modules import mc_modules as mc
from jaggedrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from jr_testing import random_kjt

ZCH = {"t0": 40, "t1": 33}  # more rows than the ids 0..24 the batches use


def _mcc(configs, interval: int = 1) -> mc.ManagedCollisionCollection:
    modules = {c.name: mc.MCHManagedCollisionModule(zch_size=ZCH[c.name], device=torch.device("cpu"),
                                                    eviction_policy=mc.LFU_EvictionPolicy(), eviction_interval=interval,
                                                    name=c.name) for c in configs}
    for m in modules.values():
        # room for the largest batch: by default the history is sized from the first batch (as
        # TorchRec's) and ids past it are dropped, to read the fallback row and be counted
        m.init_history(200)
    return mc.ManagedCollisionCollection(modules, configs)


@pytest.mark.parametrize("bags", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_equals_static_collection_on_remapped_ids(bags, dtype):
    torch.manual_seed(0)
    cls = jr.EmbeddingBagConfig if bags else jr.EmbeddingConfig
    dims = {"t0": 5, "t1": 5} if not bags else {"t0": 5, "t1": 7}
    configs = [cls(name="t0", embedding_dim=dims["t0"], num_embeddings=ZCH["t0"], feature_names=["a", "b"]),
               cls(name="t1", embedding_dim=dims["t1"], num_embeddings=ZCH["t1"], feature_names=["c"])]
    static = jr.EmbeddingBagCollection(tables=configs) if bags else jr.EmbeddingCollection(tables=configs)
    wrapper = ManagedCollisionEmbeddingBagCollection if bags else ManagedCollisionEmbeddingCollection
    model = wrapper(static, _mcc(configs), return_remapped_features=True)
    gen = torch.Generator().manual_seed(1)
    rows: Dict[tuple, int] = {}
    for step in range(6):
        # shuffled keys, an extra feature no table reads, empty bags and a key with no ids
        kjt = random_kjt(gen, ["c", "x", "b", "a"], {"a": 25, "b": 25, "c": 25, "x": 99}, 5, id_dtype=dtype,
                         empty_keys=["b"] if step == 2 else ()).kjt
        out, remapped = model(kjt)
        assert remapped.keys() == ["a", "b", "c"] and remapped.values().dtype == dtype
        expected = static(remapped)
        if bags:
            assert torch.equal(out.values(), expected.values()) and out.keys() == expected.keys()
        else:
            for k in expected:
                assert torch.equal(out[k].values(), expected[k].values())
        for key, table in (("a", "t0"), ("b", "t0"), ("c", "t1")):
            assert torch.equal(remapped[key].lengths(), kjt[key].lengths())
            for raw, row in zip(kjt[key].values().tolist(), remapped[key].values().tolist()):
                assert row != ZCH[table] - 1, "an id read the fallback row although there was room"
                assert rows.setdefault((table, raw), row) == row, "an id changed rows without an eviction"
    for table in ZCH:  # one row per (table, id)
        held = [r for (t, _), r in rows.items() if t == table]
        assert len(held) == len(set(held))


def test_config_mismatch_and_missing_feature_raise():
    configs = [jr.EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=40, feature_names=["a"])]
    other = [jr.EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["a"])]
    with pytest.raises(ValueError, match="same table configs"):
        ManagedCollisionEmbeddingBagCollection(jr.EmbeddingBagCollection(tables=other), _mcc(configs))
    with pytest.raises(ValueError, match="t0"):
        mc.ManagedCollisionCollection({"t0": mc.MCHManagedCollisionModule(
            zch_size=7, device=torch.device("cpu"), eviction_policy=mc.LRU_EvictionPolicy(), eviction_interval=1)},
            configs)
    model = ManagedCollisionEmbeddingBagCollection(jr.EmbeddingBagCollection(tables=configs), _mcc(configs))
    kjt = jr.KeyedJaggedTensor(keys=["z"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="'a'"):
        model(kjt)


def test_mc_ebc_compiles_into_one_graph():
    """fullgraph over 12 batches (evictions every 3): no graph break, the eager model's rows and
    pooled output."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    def build():
        torch.manual_seed(0)
        configs = [jr.EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=40, feature_names=["a"])]
        return ManagedCollisionEmbeddingBagCollection(jr.EmbeddingBagCollection(tables=configs), _mcc(configs, 3),
                                                      return_remapped_features=True)
    torch._dynamo.reset()
    counters.clear()
    eager, model = build(), build()
    cnt = CompileCounter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        lengths = torch.randint(0, 4, (6,), generator=gen)
        kjt = jr.KeyedJaggedTensor(keys=["a"], values=torch.randint(0, 80, (int(lengths.sum()),), generator=gen),
                                   lengths=lengths)
        (out_e, rem_e), (out_c, rem_c) = eager(kjt), compiled(kjt)
        assert torch.equal(rem_e.values(), rem_c.values()) and torch.equal(out_e.values(), out_c.values())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert cnt.frame_count <= 2
    torch._dynamo.reset()
