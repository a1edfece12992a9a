"""Sharded managed-collision collections (bodies in ``mc_sharding_cases.py``): MC-EBC and MC-EC
under DistributedModelParallel beside a static collection, table-wise, row-wise (buckets
remapped on one rank and looked up on another) and mixed, trained with evictions against the
unsharded model fed the global batch (MCH tables, and a HashZch table); bad batches raise on
every rank; TrainPipelineSparseDist gives the plain loop's results; checkpoints reshard
2 -> 1 -> 3 ranks bit for bit. One launch per world size and leg (gloo)."""

import pytest

import mc_sharding_cases as cases
from distributed_harness import run_ranks


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_mc_collections_train_as_the_unsharded_model(world):
    calls = [("train_cases",), ("hash_cases",), ("bad_input_cases",), ("from_trained_cases",)]
    calls += [("pipeline_cases",)] * (world == 2)
    results = run_ranks(cases.run, world, calls, timeout=500, collective_timeout=60)
    trained, hashed, messages, from_trained = list(zip(*results))[:4]
    assert all(f == ["tw", "rw"] for f in from_trained)
    if world == 2:  # the batch's KJT is remapped before the collection: its dist sent ahead is not taken
        assert all(r[4] == {"inner.mc._embedding_module": 5} for r in results), results
    assert all(t == [f"{k}-{p}" for k in ("ebc", "ec") for p in ("tw", "rw", "mixed")] for t in trained)
    assert all(h == ["hash-rw", "hash-mixed"] for h in hashed)
    bad = world - 1
    for rank, (out_of_range, missing, unplaced) in enumerate(messages):
        # the rank with the bad batch names the feature; the others say which rank rejected it
        assert ("u2" in out_of_range) if rank == bad else (f"rank {bad} rejected" in out_of_range), out_of_range
        assert ("features ['i1']" in missing) if rank == 0 else ("rank 0 rejected" in missing), missing
        assert "unplaced='raise'" in unplaced or "rejected" in unplaced, unplaced


def test_checkpoint_reshards_two_one_three_ranks_bit_exact(tmp_path):
    root = str(tmp_path)
    for leg, (world, _, _, _) in enumerate(cases.JOURNEY):
        notes = run_ranks(cases.run, world, [("checkpoint_cases", leg, root)], timeout=400, collective_timeout=60)
        if leg:
            assert all(n[0] and all("blocks" in x for x in n[0]) for n in notes), notes
