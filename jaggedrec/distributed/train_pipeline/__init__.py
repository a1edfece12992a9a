"""TorchRec's train pipelines at TorchRec's path, ``jaggedrec.distributed.train_pipeline``:
``TrainPipelineBase``, ``TrainPipelineSparseDist`` and ``TrainPipelineSemiSync``
(``train_pipelines.py``), which send batches' KJTs ahead to the sharded modules without
tracing the model; docs/training.md describes their stages, fallbacks and staleness."""

from jaggedrec.distributed.train_pipeline.train_pipelines import (In, Out, TrainPipeline, TrainPipelineBase,
                                                                  TrainPipelineSemiSync, TrainPipelineSparseDist)

__all__ = ["In", "Out", "TrainPipeline", "TrainPipelineBase", "TrainPipelineSemiSync", "TrainPipelineSparseDist"]
