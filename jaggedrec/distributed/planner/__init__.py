"""The sharding planner: a readable cost model and greedy placement under memory caps.

Pure Python; planning needs no process group (``collective_plan`` only broadcasts rank 0's plan).
"""

from jaggedrec.distributed.planner.planners import EmbeddingShardingPlanner
from jaggedrec.distributed.planner.types import ParameterConstraints, PlannerError, Topology

__all__ = ["EmbeddingShardingPlanner", "ParameterConstraints", "PlannerError", "Topology"]
