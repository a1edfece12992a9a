"""The rank runner the distributed tests use: ``jaggedrec.testing``'s (one copy for the tests,
the sharded benchmark and the examples; see ``jaggedrec/testing/ranks.py``).

``run_ranks(worker, world_size, *args)`` (gloo; ``backend="nccl"``: one GPU per rank) calls
``worker(rank, world_size, *args)`` on every rank after ``init_process_group`` and returns
the ranks' return values, rank by rank. An exception on any rank, a rank that dies, or a run
past ``timeout`` fails the call (``RankFailure``) with the ranks' tracebacks. Spawned ranks
inherit the environment, so conftest's ``TRITON_INTERPRET=1`` (no CUDA) holds in them too.
"""

from jaggedrec.testing import RankFailure, free_port, run_ranks

__all__ = ["RankFailure", "free_port", "run_ranks"]
