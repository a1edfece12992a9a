"""TorchRec's module paths with ``torchrec`` replaced by ``jaggedrec`` (docs/torchrec_paths.md):
every path we promise resolves, to one object whatever path it is reached by, and every path
of TorchRec's examples and intro tutorial that does not resolve is explained in the docs.

The measure is data here: the (module, name) pairs the ``from torchrec... import`` statements
of TorchRec's ``examples/`` (v1.8.0-rc1) and of its intro tutorial name, with ``None`` for a
bare ``import``; no TorchRec source is needed. Where TorchRec is installed, each promised pair
is also checked to be TorchRec's, so the list cannot promise a path TorchRec does not have.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest
from torch import nn

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "torchrec_paths.md"

# every (module, name) TorchRec's examples import (70 pairs)
EXAMPLE_IMPORTS = [
    ("torchrec", ["EmbeddingBagCollection", "EmbeddingCollection", "EmbeddingConfig", "JaggedTensor",
                  "KeyedJaggedTensor", "KeyedTensor", None, "inference", "test_utils"]),
    ("torchrec.datasets.criteo", ["CAT_FEATURE_COUNT", "DEFAULT_CAT_NAMES", "DEFAULT_INT_NAMES",
                                  "TOTAL_TRAINING_SAMPLES"]),
    ("torchrec.datasets.movielens", ["DEFAULT_RATINGS_COLUMN_NAMES"]),
    ("torchrec.datasets.random", ["RandomRecDataset"]),
    ("torchrec.datasets.utils", ["Batch"]),
    ("torchrec.distributed", ["DistributedModelParallel", None, "TrainPipelineSparseDist"]),
    ("torchrec.distributed.embedding", ["EmbeddingCollectionSharder"]),
    ("torchrec.distributed.embedding_types", ["EmbeddingComputeKernel"]),
    ("torchrec.distributed.embeddingbag", ["EmbeddingBagCollectionSharder"]),
    ("torchrec.distributed.fbgemm_qcomm_codec", ["CommType", "QCommsConfig", "get_qcomm_codecs_registry"]),
    ("torchrec.distributed.fused_embeddingbag", ["FusedEmbeddingBagCollectionSharder"]),
    ("torchrec.distributed.model_parallel", ["DistributedModelParallel"]),
    ("torchrec.distributed.planner", ["EmbeddingShardingPlanner", "ParameterConstraints", "Topology"]),
    ("torchrec.distributed.planner.enumerators", ["EmbeddingEnumerator"]),
    ("torchrec.distributed.planner.shard_estimators", ["EmbeddingPerfEstimator", "EmbeddingStorageEstimator"]),
    ("torchrec.distributed.planner.types", ["ParameterConstraints", "ShardingPlan"]),
    ("torchrec.distributed.quant_embeddingbag", ["QuantEmbeddingBagCollectionSharder"]),
    ("torchrec.distributed.types", ["ModuleSharder", "ShardingEnv", "ShardingType"]),
    ("torchrec.inference.model_packager", ["PredictFactoryPackager", "load_pickle_config"]),
    ("torchrec.inference.modules", ["PredictFactory", "PredictModule", "quantize_embeddings"]),
    ("torchrec.inference.state_dict_transform", ["state_dict_gather", "state_dict_to_device"]),
    ("torchrec.metrics.throughput", ["ThroughputMetric"]),
    ("torchrec.models.dlrm", ["DLRM", "DLRMTrain"]),
    ("torchrec.modules.embedding_configs", ["DataType", "EmbeddingBagConfig", "EmbeddingConfig"]),
    ("torchrec.modules.embedding_modules", ["EmbeddingBagCollection", "EmbeddingCollection"]),
    ("torchrec.modules.fused_embedding_modules", ["fuse_embedding_optimizer"]),
    ("torchrec.modules.hash_mc_evictions", ["HashZchEvictionConfig", "HashZchEvictionPolicyName"]),
    ("torchrec.modules.hash_mc_modules", ["HashZchManagedCollisionModule"]),
    ("torchrec.modules.mc_embedding_modules", ["ManagedCollisionEmbeddingCollection"]),
    ("torchrec.modules.mc_modules", ["DistanceLFU_EvictionPolicy", "MCHManagedCollisionModule",
                                     "ManagedCollisionCollection"]),
    ("torchrec.modules.mlp", ["MLP"]),
    ("torchrec.optim", [None]),
    ("torchrec.optim.keyed", ["CombinedOptimizer", "KeyedOptimizerWrapper"]),
    ("torchrec.optim.optimizers", ["in_backward_optimizer_filter"]),
    ("torchrec.optim.rowwise_adagrad", ["RowWiseAdagrad"]),
    ("torchrec.sparse.jagged_tensor", ["KeyedJaggedTensor"]),
    ("torchrec.test_utils", ["skip_if_asan"]),
]

# the intro tutorial's, sharding and inference sections included
TUTORIAL_IMPORTS = [
    ("torchrec", [None, "JaggedTensor", "KeyedJaggedTensor", "distributed"]),
    ("torchrec.distributed", ["DistributedModelParallel", "ShardingEnv"]),
    ("torchrec.distributed.embeddingbag", ["EmbeddingBagCollectionSharder"]),
    ("torchrec.distributed.planner", ["EmbeddingShardingPlanner", "Topology"]),
    ("torchrec.distributed.types", ["ShardingEnv", "LazyAwaitable"]),
    ("torchrec.optim.optimizers", ["in_backward_optimizer_filter"]),
    ("torchrec.modules.embedding_configs", ["QuantConfig"]),
    ("torchrec.quant.embedding_modules", ["EmbeddingBagCollection"]),
    ("torchrec.distributed.shard", ["_shard_modules"]),
    ("torchrec.fx", ["Tracer"]),
]

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
    # optim
    ("jaggedrec.optim", "KeyedOptimizer", "jaggedrec.optim.keyed"),
    ("jaggedrec.optim", "KeyedOptimizerWrapper", "jaggedrec.optim.keyed"),
    ("jaggedrec.optim", "CombinedOptimizer", "jaggedrec.optim.keyed"),
    ("jaggedrec.optim.keyed", "KeyedOptimizer", "jaggedrec.optim.keyed"),
    ("jaggedrec.optim.keyed", "KeyedOptimizerWrapper", "jaggedrec.optim.keyed"),
    ("jaggedrec.optim.keyed", "CombinedOptimizer", "jaggedrec.optim.keyed"),
    ("jaggedrec.optim.optimizers", "in_backward_optimizer_filter", "jaggedrec.optim.optimizers"),
    ("jaggedrec.optim.rowwise_adagrad", "RowWiseAdagrad", "jaggedrec.optim.rowwise_adagrad"),
    # inference
    ("jaggedrec.inference.modules", "quantize_embeddings", "jaggedrec.quant.embedding_modules"),
    ("jaggedrec.inference.state_dict_transform", "state_dict_gather", "jaggedrec.inference.state_dict_transform"),
    ("jaggedrec.inference.state_dict_transform", "state_dict_to_device", "jaggedrec.inference.state_dict_transform"),
    # the sparse types, modules and configs
    ("jaggedrec", "JaggedTensor", "jaggedrec.sparse.jagged_tensor"),
    ("jaggedrec", "KeyedJaggedTensor", "jaggedrec.sparse.jagged_tensor"),
    ("jaggedrec", "KeyedTensor", "jaggedrec.sparse.jagged_tensor"),
    ("jaggedrec", "EmbeddingBagCollection", "jaggedrec.modules.embedding_modules"),
    ("jaggedrec", "EmbeddingCollection", "jaggedrec.modules.embedding_modules"),
    ("jaggedrec", "EmbeddingConfig", "jaggedrec.modules.embedding_configs"),
    ("jaggedrec", "EmbeddingBagConfig", "jaggedrec.modules.embedding_configs"),
    ("jaggedrec", "PoolingType", "jaggedrec.modules.embedding_configs"),
    ("jaggedrec.sparse.jagged_tensor", "KeyedJaggedTensor", "jaggedrec.sparse.jagged_tensor"),
    ("jaggedrec.modules.embedding_configs", "EmbeddingBagConfig", "jaggedrec.modules.embedding_configs"),
    ("jaggedrec.modules.embedding_configs", "EmbeddingConfig", "jaggedrec.modules.embedding_configs"),
    ("jaggedrec.modules.embedding_configs", "DataType", "jaggedrec.modules.embedding_configs"),
    ("jaggedrec.modules.embedding_modules", "EmbeddingBagCollection", "jaggedrec.modules.embedding_modules"),
    ("jaggedrec.modules.embedding_modules", "EmbeddingCollection", "jaggedrec.modules.embedding_modules"),
    ("jaggedrec.quant.embedding_modules", "EmbeddingBagCollection", "jaggedrec.quant.embedding_modules"),
    # what the golden training example needs beside the train pipeline
    ("jaggedrec.datasets.criteo", "DEFAULT_CAT_NAMES", "jaggedrec.datasets.criteo"),
    ("jaggedrec.datasets.criteo", "DEFAULT_INT_NAMES", "jaggedrec.datasets.criteo"),
    ("jaggedrec.datasets.criteo", "CAT_FEATURE_COUNT", "jaggedrec.datasets.criteo"),
    ("jaggedrec.datasets.criteo", "TOTAL_TRAINING_SAMPLES", "jaggedrec.datasets.criteo"),
    ("jaggedrec.datasets.random", "RandomRecDataset", "jaggedrec.datasets.random"),
    ("jaggedrec.datasets.utils", "Batch", "jaggedrec.datasets.utils"),
    ("jaggedrec.models.dlrm", "DLRM", "jaggedrec.models.dlrm"),
    ("jaggedrec.models.dlrm", "DLRM_DCN", "jaggedrec.models.dlrm"),
    ("jaggedrec.models.dlrm", "DLRM_Projection", "jaggedrec.models.dlrm"),
    ("jaggedrec.models.dlrm", "DLRMTrain", "jaggedrec.models.dlrm"),
    ("jaggedrec.modules.mlp", "MLP", "jaggedrec.modules.mlp"),
    ("jaggedrec.modules.crossnet", "LowRankCrossNet", "jaggedrec.modules.crossnet"),
    ("jaggedrec.modules.activation", "SwishLayerNorm", "jaggedrec.modules.activation"),
    ("jaggedrec.streamable", "Pipelineable", "jaggedrec.streamable"),
    ("jaggedrec.distributed.fbgemm_qcomm_codec", "CommType", "jaggedrec.distributed.fbgemm_qcomm_codec"),
    ("jaggedrec.distributed.fbgemm_qcomm_codec", "QCommsConfig", "jaggedrec.distributed.fbgemm_qcomm_codec"),
    ("jaggedrec.distributed.fbgemm_qcomm_codec", "get_qcomm_codecs_registry",
     "jaggedrec.distributed.fbgemm_qcomm_codec"),
    # the train pipelines, at TorchRec's top level and at their module's path
    ("jaggedrec.distributed", "TrainPipelineSparseDist", "jaggedrec.distributed.train_pipeline.train_pipelines"),
    ("jaggedrec.distributed.train_pipeline", "TrainPipelineBase",
     "jaggedrec.distributed.train_pipeline.train_pipelines"),
    ("jaggedrec.distributed.train_pipeline", "TrainPipelineSparseDist",
     "jaggedrec.distributed.train_pipeline.train_pipelines"),
    ("jaggedrec.distributed.train_pipeline.train_pipelines", "TrainPipelineSemiSync",
     "jaggedrec.distributed.train_pipeline.train_pipelines"),
    # managed collisions and feature processors
    ("jaggedrec.modules.mc_modules", "MCHManagedCollisionModule", "jaggedrec.modules.mc_modules"),
    ("jaggedrec.modules.mc_modules", "ManagedCollisionCollection", "jaggedrec.modules.mc_modules"),
    ("jaggedrec.modules.mc_modules", "DistanceLFU_EvictionPolicy", "jaggedrec.modules.mc_eviction"),
    ("jaggedrec.modules.mc_embedding_modules", "ManagedCollisionEmbeddingCollection",
     "jaggedrec.modules.mc_embedding_modules"),
    ("jaggedrec.modules.mc_embedding_modules", "ManagedCollisionEmbeddingBagCollection",
     "jaggedrec.modules.mc_embedding_modules"),
    ("jaggedrec.modules.hash_mc_modules", "HashZchManagedCollisionModule", "jaggedrec.modules.hash_mc_modules"),
    ("jaggedrec.modules.hash_mc_evictions", "HashZchEvictionConfig", "jaggedrec.modules.hash_mc_evictions"),
    ("jaggedrec.modules.hash_mc_evictions", "HashZchEvictionPolicyName", "jaggedrec.modules.hash_mc_evictions"),
    ("jaggedrec.modules.feature_processor_", "PositionWeightedModule", "jaggedrec.modules.feature_processor_"),
    ("jaggedrec.modules.fp_embedding_modules", "FeatureProcessedEmbeddingBagCollection",
     "jaggedrec.modules.fp_embedding_modules"),
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


def _pairs(imports):
    return [(m, n) for m, names in imports for n in names]


def _ours(module: str) -> str:
    return "jaggedrec" + module[len("torchrec"):]


def _resolves(module: str, name) -> bool:
    """As Python's import does: the attribute, or else a submodule of that name."""
    try:
        found = importlib.import_module(_ours(module))
    except ImportError:
        return False
    if name is None or hasattr(found, name):
        return True
    try:
        importlib.import_module(f"{_ours(module)}.{name}")
    except ImportError:
        return False
    return True


def test_every_promised_import_of_the_examples_and_tutorial_resolves():
    promised = {(m, n) for m, n, _ in PROMISED}
    for module, name in _pairs(EXAMPLE_IMPORTS) + _pairs(TUTORIAL_IMPORTS):
        if (_ours(module), name) in promised:
            assert _resolves(module, name), (module, name)
    # the measure: of the examples' 70 pairs, at least the 56 counted in the docs resolve
    assert len(_pairs(EXAMPLE_IMPORTS)) == 70
    assert sum(_resolves(m, n) for m, n in _pairs(EXAMPLE_IMPORTS)) >= 56


def _documented_rows():
    """The docs' table rows: (the torchrec modules they name, the names they name)."""
    rows = []
    for line in DOCS.read_text().splitlines():
        if line.startswith("| `torchrec"):
            path_cell = line.split("|")[1]
            rows.append((set(re.findall(r"`(torchrec[\w.]*)`", path_cell)), set(re.findall(r"`(\w+)`", path_cell))))
    return rows


@pytest.mark.parametrize("module, name", _pairs(EXAMPLE_IMPORTS) + _pairs(TUTORIAL_IMPORTS))
def test_each_unresolved_import_is_explained_in_the_docs(module, name):
    if _resolves(module, name):
        return
    rows = _documented_rows()
    assert any((module in modules and (name is None or name in names)) or f"{module}.{name}" in modules
               for modules, names in rows), f"docs/torchrec_paths.md has no row for {module} {name}"


@pytest.mark.parametrize("module, name", sorted({(m, n) for m, n, _ in PROMISED}))
def test_promised_path_is_torchrecs(module, name):
    pytest.importorskip("torchrec")
    theirs = importlib.import_module("torchrec" + module[len("jaggedrec"):])
    assert hasattr(theirs, name), f"torchrec{module[len('jaggedrec'):]} has no {name}: not a TorchRec path"


def test_sharders_are_module_sharders():
    from jaggedrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
    from jaggedrec.distributed import (EmbeddingBagCollectionSharder, EmbeddingCollectionSharder,
                                       FeatureProcessedEmbeddingBagCollectionSharder, ModuleSharder,
                                       get_default_sharders)

    from jaggedrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
    from jaggedrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder

    from jaggedrec.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder

    sharders = get_default_sharders()  # the hash collection's first: it is an EmbeddingBagCollection too
    assert [type(s) for s in sharders[1:]] == [EmbeddingBagCollectionSharder,
                                               FeatureProcessedEmbeddingBagCollectionSharder,
                                               EmbeddingCollectionSharder, ManagedCollisionEmbeddingBagCollectionSharder,
                                               ManagedCollisionEmbeddingCollectionSharder]
    assert type(sharders[0]) is HashEmbeddingBagCollectionSharder
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


def test_subpackages_are_attributes_after_a_plain_import():
    """TorchRec's tutorial writes ``torchrec.distributed.DistributedModelParallel`` after
    ``import torchrec``; a fresh interpreter, so no test has imported the subpackages yet."""
    import subprocess
    import sys

    code = ("import sys, jaggedrec; assert 'jaggedrec.distributed' not in sys.modules; "
            "from jaggedrec.distributed.model_parallel import DistributedModelParallel as D; "
            "assert jaggedrec.distributed.DistributedModelParallel is D; "
            "assert jaggedrec.inference.modules.quantize_embeddings is jaggedrec.quant.quantize_embeddings; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
