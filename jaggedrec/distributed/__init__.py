"""Model-parallel sharding of jaggedrec's collections over ``torch.distributed``, with
TorchRec's module paths: ``types``, ``sharding_plan``, ``planner``, ``embeddingbag``,
``model_parallel``."""

from jaggedrec.distributed.types import ParameterSharding, ShardingEnv, ShardingPlan, ShardingType

__all__ = ["ParameterSharding", "ShardingEnv", "ShardingPlan", "ShardingType"]
