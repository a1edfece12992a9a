"""Sharded HashEmbeddingBagCollection (bodies in ``hash_sharding_cases.py``): hashed tables
beside a static one under DistributedModelParallel, table-wise, row-wise (row blocks that cut
buckets: an eviction resets a row on another rank) and mixed, trained with evictions against
the unsharded module fed the global batch (rows, id maps, last steps and counts bit for bit;
outputs and tables to fp32 tolerance), with an empty rank and int32 ids; bad batches raise on
every rank (a missing feature, float ids, ids that find no slot under
unplaced='raise'); checkpoints reshard 2 -> 1 -> 3 ranks bit for bit (and every live id of the
oracle, kept in a dict, reads its row after each load); a rank holds one module per table (its
run of buckets, 2048 buckets in one case) and the per-feature counts of unplaced and fallback ids, summed
over the ranks, are the unsharded module's. Gloo; every case runs in the one launch that
sharding_journey.py shares with test_mc_sharding.py (its deadline bounds these tests)."""

import pytest

import hash_sharding_cases as cases
import sharding_journey as journey


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_hash_collection_trains_as_the_unsharded_module(world):
    for rank, (trained, (missing, float_ids, unplaced)) in enumerate(
            zip(journey.of(world, "hash.train_cases"), journey.of(world, "hash.bad_input_cases"))):
        assert trained == ["tw", "rw", "mixed"]
        # the rank with the bad batch names the problem; the others say which rank rejected it
        assert ("features ['i1']" in missing) if rank == 0 else ("rank 0 rejected" in missing), missing
        assert "float32" in float_ids and ((rank == world - 1) or f"rank {world - 1} rejected" in float_ids)
        assert "unplaced='raise'" in unplaced and "hash table 'u'" in unplaced, unplaced


def test_checkpoint_reshards_two_one_three_ranks_bit_exact():
    for leg, (world, _, _, _) in enumerate(cases.JOURNEY):
        notes = journey.of(world, "hash.checkpoint_leg")
        if leg:
            assert all(n and "blocks" in n[0] for n in notes), notes
            assert sum(int(n[0].split(", ")[1].split()[0]) for n in notes) == 7, notes  # every bucket held once
            assert sum(int(n[0].split(", ")[2].split()[0]) for n in notes) > 10, notes  # live ids looked up


def test_a_rank_holds_one_module_per_table_of_2048_buckets():
    assert journey.of(3, "hash.many_buckets_cases") == [["rw", "tw"]] * 3


def test_hashed_table_column_wise_is_refused_naming_it():
    import torch

    from jaggedrec.distributed import ShardingEnv
    from jaggedrec.distributed.hash_embeddingbag import HashEmbeddingBagCollectionSharder
    from jaggedrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise

    model = cases.Model()
    plan = construct_module_sharding_plan(model.hash, {"u": column_wise(ranks=[0]), "i": table_wise(rank=0),
                                                       "s": table_wise(rank=0)}, world_size=1)
    with pytest.raises(ValueError, match="hash table 'u' is column_wise"):
        HashEmbeddingBagCollectionSharder().shard(model.hash, plan, ShardingEnv(1, 0, None), torch.device("cpu"))
