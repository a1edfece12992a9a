"""TorchRec's module paths with ``torchrec`` replaced by ``jaggedrec``: every path we promise
(docs/torchrec_paths.md) resolves, to one object whatever path it is reached by.

The promise is data here, the (module, name) pairs TorchRec's examples and intro tutorial
import that name something jaggedrec implements; no TorchRec source is needed. Where TorchRec
is installed, each pair is also checked to be TorchRec's, so the list cannot promise a path
TorchRec does not have.
"""

from __future__ import annotations

import importlib

import pytest
from torch import nn

# (TorchRec module with torchrec -> jaggedrec, name, the module that defines it)
PROMISED = [
    # torchrec.distributed's top-level names, DistributedModelParallel first
    ("jaggedrec.distributed", "DistributedModelParallel", "jaggedrec.distributed.model_parallel"),
    ("jaggedrec.distributed", "Awaitable", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "ModuleSharder", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "NoWait", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "ParameterSharding", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "ShardedTensor", "torch.distributed._shard.sharded_tensor"),
    ("jaggedrec.distributed", "ShardingEnv", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "ShardingPlanner", "jaggedrec.distributed.types"),
    # the examples' and the tutorial's distributed paths
    ("jaggedrec.distributed.model_parallel", "DistributedModelParallel", "jaggedrec.distributed.model_parallel"),
    ("jaggedrec.distributed.model_parallel", "get_default_sharders", "jaggedrec.distributed.sharding_plan"),
    ("jaggedrec.distributed.sharding_plan", "get_default_sharders", "jaggedrec.distributed.sharding_plan"),
    ("jaggedrec.distributed.types", "ModuleSharder", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed.types", "ShardingType", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed.types", "ShardingEnv", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed.types", "ShardingPlan", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed.types", "LazyAwaitable", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed.embedding_types", "EmbeddingComputeKernel", "jaggedrec.distributed.embedding_types"),
    ("jaggedrec.distributed.embeddingbag", "EmbeddingBagCollectionSharder", "jaggedrec.distributed.embeddingbag"),
    ("jaggedrec.distributed.embeddingbag", "ShardedEmbeddingBagCollection", "jaggedrec.distributed.embeddingbag"),
    ("jaggedrec.distributed.embedding", "EmbeddingCollectionSharder", "jaggedrec.distributed.embedding"),
    ("jaggedrec.distributed.embedding", "ShardedEmbeddingCollection", "jaggedrec.distributed.embedding"),
    ("jaggedrec.distributed.planner", "EmbeddingShardingPlanner", "jaggedrec.distributed.planner.planners"),
    ("jaggedrec.distributed.planner", "Topology", "jaggedrec.distributed.planner.types"),
    ("jaggedrec.distributed.planner", "ParameterConstraints", "jaggedrec.distributed.planner.types"),
    ("jaggedrec.distributed.planner.types", "ParameterConstraints", "jaggedrec.distributed.planner.types"),
    ("jaggedrec.distributed.planner.types", "Topology", "jaggedrec.distributed.planner.types"),
    ("jaggedrec.distributed.planner.types", "PlannerError", "jaggedrec.distributed.planner.types"),
    ("jaggedrec.distributed.planner.types", "ShardingPlan", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed.planner.types", "ModuleSharder", "jaggedrec.distributed.types"),
]

# jaggedrec's own conveniences beside TorchRec's names (TorchRec has them one level down)
EXTRA = [
    ("jaggedrec.distributed", "EmbeddingBagCollectionSharder", "jaggedrec.distributed.embeddingbag"),
    ("jaggedrec.distributed", "EmbeddingCollectionSharder", "jaggedrec.distributed.embedding"),
    ("jaggedrec.distributed", "ShardingPlan", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "ShardingType", "jaggedrec.distributed.types"),
    ("jaggedrec.distributed", "get_default_sharders", "jaggedrec.distributed.sharding_plan"),
    ("jaggedrec.distributed.types", "EmbeddingComputeKernel", "jaggedrec.distributed.embedding_types"),
    ("jaggedrec.distributed.planner.planners", "PlannerError", "jaggedrec.distributed.planner.types"),
]


@pytest.mark.parametrize("module, name, home", PROMISED + EXTRA, ids=lambda x: x if isinstance(x, str) else "")
def test_path_resolves_to_one_object(module, name, home):
    found = getattr(importlib.import_module(module), name, None)
    assert found is not None, f"{module}.{name} does not resolve"
    assert found is getattr(importlib.import_module(home), name), f"{module}.{name} is not {home}.{name}"


@pytest.mark.parametrize("module, name", sorted({(m, n) for m, n, _ in PROMISED}))
def test_promised_path_is_torchrecs(module, name):
    pytest.importorskip("torchrec")
    theirs = importlib.import_module("torchrec" + module[len("jaggedrec"):])
    assert hasattr(theirs, name), f"torchrec{module[len('jaggedrec'):]} has no {name}: not a TorchRec path"


def test_sharders_are_module_sharders():
    from jaggedrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
    from jaggedrec.distributed import (EmbeddingBagCollectionSharder, EmbeddingCollectionSharder, ModuleSharder,
                                       get_default_sharders)

    sharders = get_default_sharders()
    assert [type(s) for s in sharders] == [EmbeddingBagCollectionSharder, EmbeddingCollectionSharder]
    assert all(isinstance(s, ModuleSharder) for s in sharders)
    assert ModuleSharder[nn.Module] is not None  # TorchRec's examples annotate with it
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t0", embedding_dim=3, num_embeddings=5, feature_names=["a"]),
                                  EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=7,
                                                     feature_names=["b", "c"])])
    weights = EmbeddingBagCollectionSharder().shardable_parameters(ebc)
    state = ebc.state_dict()
    assert list(weights) == ["t0", "t1"]
    for name, w in weights.items():
        assert w.data_ptr() == state[f"embedding_bags.{name}.weight"].data_ptr()
        assert w.shape == state[f"embedding_bags.{name}.weight"].shape
    ec = EmbeddingCollection([EmbeddingConfig(name="u", embedding_dim=2, num_embeddings=6, feature_names=["x"])])
    assert {k: tuple(v.shape) for k, v in EmbeddingCollectionSharder().shardable_parameters(ec).items()} == {"u": (6, 2)}


def test_module_sharder_contract():
    from jaggedrec.distributed import EmbeddingBagCollectionSharder, ModuleSharder

    with pytest.raises(TypeError):
        ModuleSharder()  # shard and module_type are abstract

    class Partial(ModuleSharder[nn.Linear]):
        @property
        def module_type(self):
            return nn.Linear

    with pytest.raises(TypeError):
        Partial()
    # no quantized collectives: None (the examples' gloo path) is taken, codecs are refused by name
    assert EmbeddingBagCollectionSharder(qcomm_codecs_registry=None).qcomm_codecs_registry is None
    with pytest.raises(ValueError, match="qcomm_codecs_registry.*forward"):
        EmbeddingBagCollectionSharder(qcomm_codecs_registry={"forward": object()})


def test_no_wait_and_planner_base():
    from jaggedrec.distributed import NoWait, ShardingPlanner
    from jaggedrec.distributed.planner import EmbeddingShardingPlanner

    value = object()
    assert NoWait(value).wait() is value
    assert isinstance(EmbeddingShardingPlanner(), ShardingPlanner)
