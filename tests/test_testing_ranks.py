"""jaggedrec.testing.run_ranks: return values rank by rank, values sent while running, and
that a rank which raises, dies or hangs fails the call quickly with what happened, never a
hang of the suite."""

import os
import time

import pytest
import torch.distributed as dist

from jaggedrec.testing import RankFailure, run_ranks, send_to_parent


def _sum_ranks(rank, world, scale):
    x = [rank * scale]
    out = [None] * world
    dist.all_gather_object(out, x)  # the group is joined: a collective works
    for k in range(2):
        send_to_parent((rank, k))
    return sum(v[0] for v in out), rank


def _raise_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank one's own failure")
    dist.barrier()  # waits for rank 1, which never comes: only the runner can end this


def _exit_on_one(rank, world):
    if rank == 1:
        os._exit(3)
    return rank


def _sleep(rank, world):
    time.sleep(60)


def test_return_values_and_messages():
    got = []
    values = run_ranks(_sum_ranks, 2, 10, on_message=lambda rank, value: got.append((rank, value)))
    assert values == [(10, 0), (10, 1)]
    assert sorted(got) == [(0, (0, 0)), (0, (0, 1)), (1, (1, 0)), (1, (1, 1))]
    assert [v for r, v in got if r == 0] == [(0, 0), (0, 1)]  # each rank's in its order


def test_a_raising_rank_fails_the_call_with_its_traceback_without_waiting_for_the_others():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank one's own failure") as e:
        run_ranks(_raise_on_one, 2, collective_timeout=120)
    assert "--- rank 1 failed" in str(e.value) and "ValueError" in str(e.value)
    assert time.monotonic() - start < 60  # rank 0's barrier would have waited 120 s


def test_a_rank_that_dies_fails_the_call():
    with pytest.raises(RankFailure, match=r"ranks \[1\] exited \(codes \[3\]\)"):
        run_ranks(_exit_on_one, 2)


def test_the_deadline_stops_every_rank():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[0, 1\] did not finish within 5 s"):
        run_ranks(_sleep, 2, timeout=5)
    assert time.monotonic() - start < 30


def test_it_imports_only_torch_and_the_standard_library():
    """jaggedrec.testing sits outside the library's layers: none of jaggedrec's other packages."""
    import ast
    import pathlib
    import sys

    import jaggedrec.testing

    for path in pathlib.Path(jaggedrec.testing.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top == "torch" or top in sys.stdlib_module_names or name.startswith("jaggedrec.testing"), \
                    (path.name, name)
