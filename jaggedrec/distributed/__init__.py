"""Model-parallel sharding of jaggedrec's collections over ``torch.distributed``, laid out as
``torchrec.distributed``: ``types``, ``embedding_types``, ``sharding_plan``, ``planner``,
``embeddingbag``, ``embedding``, ``model_parallel``, ``train_pipeline``.

The names here are TorchRec's top-level names that jaggedrec implements, each the same object
as at its module's path, the train pipelines (``train_pipeline``) among them; see
docs/torchrec_paths.md for every TorchRec path and whether it resolves.
"""

from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
from jaggedrec.distributed.model_parallel import DistributedModelParallel
from jaggedrec.distributed.sharding_plan import get_default_sharders
from jaggedrec.distributed.train_pipeline import (TrainPipeline, TrainPipelineBase, TrainPipelineSemiSync,
                                                  TrainPipelineSparseDist)
from jaggedrec.distributed.types import (Awaitable, ModuleSharder, NoWait, ParameterSharding, ShardedTensor,
                                         ShardingEnv, ShardingPlan, ShardingPlanner, ShardingType)

__all__ = [
    "Awaitable",
    "DistributedModelParallel",
    "EmbeddingBagCollectionSharder",
    "EmbeddingCollectionSharder",
    "FeatureProcessedEmbeddingBagCollectionSharder",
    "ModuleSharder",
    "NoWait",
    "ParameterSharding",
    "ShardedTensor",
    "ShardingEnv",
    "ShardingPlan",
    "ShardingPlanner",
    "ShardingType",
    "TrainPipeline",
    "TrainPipelineBase",
    "TrainPipelineSemiSync",
    "TrainPipelineSparseDist",
    "get_default_sharders",
]
