"""Sharded managed-collision collections (bodies in ``mc_sharding_cases.py``): MC-EBC and MC-EC
under DistributedModelParallel beside a static collection, table-wise, row-wise (buckets
remapped on one rank and looked up on another) and mixed, trained with evictions against the
unsharded model fed the global batch (MCH tables, and a HashZch table); bad batches raise on
every rank; TrainPipelineSparseDist gives the plain loop's results; checkpoints reshard
2 -> 1 -> 3 ranks bit for bit. Gloo; every case runs in the one launch that sharding_journey.py
shares with test_hash_sharding.py (its deadline bounds these tests)."""

import pytest

import mc_sharding_cases as cases
import sharding_journey as journey


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_mc_collections_train_as_the_unsharded_model(world):
    from_trained = journey.of(world, "mc.from_trained_cases")
    assert all(f == ["tw", "rw"] for f in from_trained)
    if world == 2:  # the batch's KJT is remapped before the collection: its dist sent ahead is not taken
        fallbacks = journey.of(world, "mc.pipeline_cases")
        assert all(r == {"inner.mc._embedding_module": 5} for r in fallbacks), fallbacks
    trained = journey.of(world, "mc.train_cases")
    assert all(t == [f"{k}-{p}" for k in ("ebc", "ec") for p in ("tw", "rw", "mixed")] for t in trained)
    assert all(h == ["hash-rw", "hash-mixed"] for h in journey.of(world, "mc.hash_cases"))
    bad = world - 1
    for rank, (out_of_range, missing, unplaced) in enumerate(journey.of(world, "mc.bad_input_cases")):
        # the rank with the bad batch names the feature; the others say which rank rejected it
        assert ("u2" in out_of_range) if rank == bad else (f"rank {bad} rejected" in out_of_range), out_of_range
        assert ("features ['i1']" in missing) if rank == 0 else ("rank 0 rejected" in missing), missing
        assert "unplaced='raise'" in unplaced or "rejected" in unplaced, unplaced


def test_checkpoint_reshards_two_one_three_ranks_bit_exact():
    for leg, (world, _, _, _) in enumerate(cases.JOURNEY):
        notes = journey.of(world, "mc.checkpoint_cases")
        if leg:
            assert all(n and all("blocks" in x for x in n) for n in notes), notes
