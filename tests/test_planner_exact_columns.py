"""The planner splits a wide table into column blocks under the fused optimizers that step rows
by whole-row sums (the shards of both collections, the bag one and the unpooled one, combine
the blocks' sums: exact_columns.py). Each block is charged the table's whole row-wise state.
Pure Python, no process group."""

import pytest

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from jaggedrec.distributed.types import ShardingType

TW, CW = ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value
WHOLE_ROWS = [optim.RowWiseAdagrad(0.1), optim.RowWiseAdagrad(0.1, weight_decay=0.1, weight_decay_mode="decouple"),
              optim.PartialRowWiseAdam(0.1), optim.LAMB(0.1), optim.PartialRowWiseLAMB(0.1), optim.LarsSGD(0.1)]
# t0: 1M x 128 fp32 is 512 MB of weights, over the cap whole; its blocks fit
SHAPES = [(1_000_000, 128), (20_000, 64), (30_000, 32)]
CAP = 400 * 2 ** 20


def _plan(collection, sharder, allowed):
    topology = Topology(world_size=4, local_world_size=4, compute_device="cuda", hbm_cap=CAP)
    return EmbeddingShardingPlanner(topology, {"t0": ParameterConstraints(sharding_types=allowed)}
                                    ).plan(collection, [sharder]).plan[""]


@pytest.mark.parametrize("unpooled", [False, True], ids=["bag", "unpooled"])
@pytest.mark.parametrize("fused", WHOLE_ROWS, ids=lambda f: f"{type(f).__name__}{f.kind}")
def test_a_wide_table_is_split_into_column_blocks_under_whole_row_optimizers(fused, unpooled):
    config, collection, sharder = ((jr.EmbeddingConfig, jr.EmbeddingCollection, EmbeddingCollectionSharder)
                                   if unpooled else
                                   (jr.EmbeddingBagConfig, jr.EmbeddingBagCollection, EmbeddingBagCollectionSharder))
    tables = [config(name=f"t{i}", num_embeddings=r, embedding_dim=d, feature_names=[f"f{i}"])
              for i, (r, d) in enumerate(SHAPES)]
    plan = _plan(collection(tables, device="meta", fused_optimizer=fused), sharder(), [TW, CW])
    sharding = plan["t0"]
    assert sharding.sharding_type == CW and len(sharding.shards) > 1, sharding
    assert sharding.compute_kernel == "fused"
    # each block holds every row, with the row-wise state of all of them, under the cap
    per_row = 4 * sum(per == "row" for _, per in fused.state)
    per_element = 4 + 4 * sum(per == "element" for _, per in fused.state)
    memory = [0] * 4
    for name, s in plan.items():
        for m in s.shards:
            rows, cols = m.shard_sizes
            memory[m.rank] += rows * cols * per_element + rows * per_row
    assert all(m.shard_sizes[0] == SHAPES[0][0] for m in sharding.shards)
    assert max(memory) <= CAP, memory


def test_element_wise_state_is_split_into_column_blocks_too():
    tables = [jr.EmbeddingConfig(name=f"t{i}", num_embeddings=r, embedding_dim=d, feature_names=[f"f{i}"])
              for i, (r, d) in enumerate(SHAPES)]
    ec = jr.EmbeddingCollection(tables, device="meta", fused_optimizer=optim.Adagrad(0.1))
    assert _plan(ec, EmbeddingCollectionSharder(), [TW, CW])["t0"].sharding_type == CW
