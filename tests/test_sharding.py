"""Sharded collections on gloo ranks against the unsharded modules on the global batch (bodies
in ``sharding_cases.py`` and ``sharding_ec_cases.py``; each launch runs many cases, a spawn
costs seconds)."""

import pytest

import sharding_cases
from distributed_harness import run_ranks


def _cases(world, *calls):
    """Run case bodies ``(module, function, *args)`` in one launch (a spawn costs seconds);
    returns each body's results per rank."""
    results = run_ranks(sharding_cases.run_cases, world, list(calls), timeout=420)
    return [[rank_results[i] for rank_results in results] for i in range(len(calls))]


@pytest.mark.parametrize("world", [2, 3])
def test_every_plan_forward_and_training_match_the_global_batch(world, tmp_path):
    """Both collections, every sharding type, a mixed plan and the planner's (forward), and
    dense, sparse and fused training over 3 steps; on 2 ranks, DMP too (hand plan and
    planner; for the unpooled collection with a dcp save and a resharded load)."""
    calls = [("sharding_cases", "forward_cases"), ("sharding_cases", "train_cases"),
             ("sharding_ec_cases", "ec_forward_cases")]
    if world == 2:
        calls += [("sharding_ec_cases", "ec_train_cases"), ("sharding_cases", "dmp_cases"),
                  ("sharding_ec_cases", "ec_dmp_checkpoint_cases", str(tmp_path))]
    import sharding_ec_cases
    out = _cases(world, *calls)
    forward, train, ec_forward = out[:3]
    assert forward[0] == forward[-1] and len(forward[0]) == 2 * (7 + 3)
    assert train[0] == list(sharding_cases.TRAIN_MODES)
    assert ec_forward[0] == ec_forward[-1] and len(ec_forward[0]) == 2 * 6
    if world == 2:
        ec_train, dmp, ec_dmp = out[3:]
        assert ec_train == [list(sharding_ec_cases.TRAIN_MODES)] * 2
        assert dmp == [["dmp/hand", "dmp/planner"]] * 2
        assert ec_dmp == [["ec/dmp+dcp"]] * 2


def test_bad_input_raises_on_every_rank():
    seen = run_ranks(sharding_cases.bad_input_cases, 2, timeout=120, collective_timeout=30)
    assert seen == [["rejected", "raised", "raised"], ["raised", "rejected", "raised"]]


def test_meta_module_shards_initialise_the_same_table_under_every_plan():
    """A module built on meta: each shard draws its block of one plan-independent table."""
    import torch

    import jaggedrec as jr
    from jaggedrec.distributed.shards import init_shard
    from jaggedrec.distributed.shard_layout import ShardLayout
    from jaggedrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise

    configs = [jr.EmbeddingBagConfig(num_embeddings=9000, embedding_dim=6, name="big", feature_names=["f"]),
               jr.EmbeddingBagConfig(num_embeddings=7, embedding_dim=5, name="small", feature_names=["g"])]
    ebc = jr.EmbeddingBagCollection(configs, device="meta")

    def table_from(per_table, world):
        layout = ShardLayout(configs, construct_module_sharding_plan(ebc, per_table, world_size=world), world)
        tables = [torch.full((c.num_embeddings, c.embedding_dim), float("nan")) for c in configs]
        for shards in layout.shards:
            for s in shards:
                block = torch.empty(s.rows, s.cols)
                init_shard(configs[s.table], s, block)
                tables[s.table][s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols] = block
        return tables

    whole = table_from({"big": table_wise(0), "small": table_wise(1)}, 2)
    for per_table, world in (({"big": row_wise(), "small": row_wise()}, 3),
                             ({"big": column_wise([0, 1, 0]), "small": column_wise([1, 0])}, 2)):
        for a, b in zip(table_from(per_table, world), whole):
            assert torch.equal(a, b)
    big = whole[0]
    bound = (1 / 9000) ** 0.5
    assert not torch.isnan(big).any() and big.abs().max() <= bound and big.std() > bound / 3
    assert not torch.equal(big[:4096], big[4096:8192])  # blocks draw from their own seeds


@pytest.mark.gpu
def test_cuda_nccl_one_rank_every_sharding_type():
    import torch
    if not torch.distributed.is_nccl_available():
        pytest.skip("NCCL is not available")
    assert run_ranks(sharding_cases.cuda_cases, 1, backend="nccl") == [["cuda"]]
