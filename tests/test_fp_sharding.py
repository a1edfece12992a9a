"""A FeatureProcessedEmbeddingBagCollection inside a model under DistributedModelParallel (2 gloo
ranks): the planner shards its inner collection with the default sharders; with the position
weights frozen, three SGD steps match the unsharded model on the global batch."""

import fp_sharding_cases
from distributed_harness import run_ranks


def test_dmp_shards_the_inner_collection():
    assert run_ranks(fp_sharding_cases.dmp_fpebc, 2, timeout=300) == ["ok", "ok"]
