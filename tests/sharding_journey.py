"""One spawned launch for every case of test_hash_sharding.py and test_mc_sharding.py.

A launch costs a spawn and the imports on every rank (on the loaded 2-core CI machine 25-40 s,
more than most cases), so the two files share one gloo launch of 3 ranks, made once per pytest
process (``results()``, cached) and read by their tests. It runs three worlds in turn, each on
a process group of the first ranks, so the sharded modules see a 2-, a 1- and a 3-rank world:

- 2 ranks: the training, bad-input and hash cases, then leg 0 of each checkpoint journey;
- 1 rank: leg 1 (loads the 2-rank checkpoints);
- 3 ranks: the training, bad-input and hash cases, a hash table of 2048 buckets, then leg 2
  (loads the 1-rank checkpoints).

Ranks outside a phase's group wait at a barrier of the whole launch, so the collectives'
deadline covers the longest phase; the launch as a whole has its own deadline.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Dict, List

import torch.distributed as dist

from distributed_harness import RankFailure, run_ranks

WORLD = 3
TIMEOUT = 900  # seconds for the whole launch (it ran in ~150 s on the loaded machine)
COLLECTIVE_TIMEOUT = 400  # a rank idle through the 2-rank phase waits this long at most

# per phase: (group size, [(file, case, args)]), in order; "{root}" is the shared directory
PHASES = [
    (2, [("hash", "train_cases", ()), ("hash", "bad_input_cases", ()), ("hash", "checkpoint_leg", (0,)),
         ("mc", "train_cases", ()), ("mc", "hash_cases", ()), ("mc", "bad_input_cases", ()),
         ("mc", "from_trained_cases", ()), ("mc", "pipeline_cases", ()), ("mc", "checkpoint_cases", (0,))]),
    (1, [("hash", "checkpoint_leg", (1,)), ("mc", "checkpoint_cases", (1,))]),
    (3, [("hash", "train_cases", ()), ("hash", "bad_input_cases", ()), ("hash", "many_buckets_cases", ()),
         ("hash", "checkpoint_leg", (2,)),
         ("mc", "train_cases", ()), ("mc", "hash_cases", ()), ("mc", "bad_input_cases", ()),
         ("mc", "from_trained_cases", ()), ("mc", "checkpoint_cases", (2,))]),
]


def _worker(rank: int, world: int, root: str) -> Dict[int, Dict[str, list]]:
    """On every rank: each phase this rank is in -> {"file.case": its return value}."""
    import hash_sharding_cases
    import mc_sharding_cases

    files = {"hash": hash_sharding_cases, "mc": mc_sharding_cases}
    out: Dict[int, Dict[str, list]] = {}
    for size, calls in PHASES:
        group = dist.new_group(list(range(size))) if size < world else dist.group.WORLD  # every rank creates it
        if rank < size:
            mc_sharding_cases.GROUP = group
            got: Dict[str, list] = {}
            for name, case, args in calls:
                got[f"{name}.{case}"] = getattr(files[name], case)(rank, size, *_with_root(case, args, root))
            out[size] = got
        mc_sharding_cases.GROUP = None
        dist.barrier()
    return out


def _with_root(case: str, args: tuple, root: str) -> tuple:
    return args + (root,) if case.startswith("checkpoint") else args


_DONE: list = []  # [results] or [the launch's failure], once made


def results() -> List[Dict[int, Dict[str, list]]]:
    """Every rank's results of the launch (rank by rank), made once per process; a failed
    launch fails every test that reads it, with the ranks' tracebacks, and is not rerun."""
    if not _DONE:
        root = tempfile.mkdtemp(prefix="jaggedrec-sharding-")
        try:
            _DONE.append(run_ranks(_worker, WORLD, root, timeout=TIMEOUT, collective_timeout=COLLECTIVE_TIMEOUT))
        except RankFailure as e:
            _DONE.append(e)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if isinstance(_DONE[0], RankFailure):
        raise _DONE[0]
    return _DONE[0]


def of(world: int, case: str) -> list:
    """``case``'s ("file.case") return value on each rank of the ``world``-rank phase."""
    return [r[world][case] for r in results()[:world]]
