"""Helpers for testing code built on jaggedrec, shipped with it as ``jaggedrec.testing``.

``run_ranks`` runs a function on every rank of a fresh ``torch.distributed`` world of spawned
processes, under a deadline, and hands back each rank's return value (or the failing rank's
traceback). The project's own tests, the sharded benchmark and the examples all use it. It
imports only torch, so it sits outside the library's layers.
"""

from jaggedrec.testing.ranks import RankFailure, free_port, run_ranks, send_to_parent

__all__ = ["RankFailure", "free_port", "run_ranks", "send_to_parent"]
