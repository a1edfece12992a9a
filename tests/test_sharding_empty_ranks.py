"""Every rank takes part in every collective of a training step, whatever it holds: ranks
with no shard and empty row blocks, both collections, with and without dense layers, on 2
and 3 gloo ranks (bodies in ``empty_rank_cases.py``). Before the fix such ranks skipped the
output dist's backward and the others waited in it until the collective timeout."""

import pytest

import empty_rank_cases
from distributed_harness import run_ranks


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_without_shards_join_every_collective(world):
    # a short collective timeout: a hang fails within the test's deadline, naming the rank
    done = run_ranks(empty_rank_cases.empty_rank_cases, world, timeout=300, collective_timeout=30)
    assert done[0] == done[-1] and len(done[0]) == 2 * 2 * 4, done
