"""Sharded HashEmbeddingBagCollection (bodies in ``hash_sharding_cases.py``): hashed tables
beside a static one under DistributedModelParallel, table-wise, row-wise (row blocks that cut
buckets: an eviction resets a row on another rank) and mixed, trained with evictions against
the unsharded module fed the global batch (rows, id maps, last steps and counts bit for bit;
outputs and tables to fp32 tolerance), with an empty rank and int32 ids; bad batches raise on
every rank (a missing feature, float ids, ids that find no slot under
unplaced='raise'); checkpoints reshard 2 -> 1 -> 3 ranks bit for bit. Gloo, one launch per world size
and leg."""

import pytest

import hash_sharding_cases as cases
from distributed_harness import run_ranks


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_hash_collection_trains_as_the_unsharded_module(world):
    results = run_ranks(cases.run, world, [("train_cases",), ("bad_input_cases",)], timeout=400,
                        collective_timeout=60)
    for rank, (trained, (missing, float_ids, unplaced)) in enumerate(results):
        assert trained == ["tw", "rw", "mixed"]
        # the rank with the bad batch names the problem; the others say which rank rejected it
        assert ("features ['i1']" in missing) if rank == 0 else ("rank 0 rejected" in missing), missing
        assert "float32" in float_ids and ((rank == world - 1) or f"rank {world - 1} rejected" in float_ids)
        assert "unplaced='raise'" in unplaced and "hash table 'u'" in unplaced, unplaced


def test_checkpoint_reshards_two_one_three_ranks_bit_exact(tmp_path):
    for leg, (world, _, _, _) in enumerate(cases.JOURNEY):
        notes = run_ranks(cases.run, world, [("checkpoint_leg", leg, str(tmp_path))], timeout=300,
                          collective_timeout=60)
        if leg:
            assert all(n[0] and "blocks" in n[0][0] for n in notes), notes
            assert sum(int(n[0][0].split(", ")[1].split()[0]) for n in notes) == 7, notes  # every bucket held once


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
