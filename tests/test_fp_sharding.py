"""A FeatureProcessedEmbeddingBagCollection under DistributedModelParallel (gloo, 2 and 3 ranks):
the default sharders shard it whole (``FeatureProcessedEmbeddingBagCollectionSharder``: the
processors dense on the input rank, the inner collection sharded), and several SGD steps with
trainable position weights match the unsharded model on the global batch, for the planner's
plan and TW, RW, CW, DP and mixed hand plans, both processor forms, dense and fused tables."""

import fp_sharding_cases
import pytest
from distributed_harness import run_ranks


@pytest.mark.parametrize("world", [2, 3])
def test_dmp_trains_position_weights(world):
    results = run_ranks(fp_sharding_cases.dmp_cases, world, timeout=300)
    assert all(r == results[0] for r in results), results
    assert len(results[0]) == (9 if world == 3 else 8), results[0]



def test_pipelines_match_the_plain_loop():
    """TrainPipelineSparseDist and TrainPipelineSemiSync with an FPEBC: the plain loop's results
    bit for bit, the processed KJT distributed by the module itself (a counted fallback a step)."""
    fallbacks = {"fp._embedding_bag_collection": 6}
    assert run_ranks(fp_sharding_cases.pipeline_cases, 2, timeout=300) == [[fallbacks] * 2] * 2
