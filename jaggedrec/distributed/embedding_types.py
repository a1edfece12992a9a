"""Names of the sharded embedding modules' vocabulary at TorchRec's path
(``torchrec.distributed.embedding_types``): how a shard is computed and updated."""

from __future__ import annotations

from enum import Enum, unique


@unique
class EmbeddingComputeKernel(Enum):
    """How a shard is updated: ``dense`` (autograd gradients) or ``fused`` (optimizer in the
    backward). jaggedrec takes the choice from the module or the sharder's ``fused_params``;
    the plan carries it for TorchRec's printout and for the planner's memory estimate.

    TorchRec's other kernels (``fused_uvm``, ``fused_uvm_caching``, ``key_value``, ...) place
    tables in host or SSD memory behind a GPU cache; jaggedrec has no such placement."""

    DENSE = "dense"
    FUSED = "fused"


__all__ = ["EmbeddingComputeKernel"]
