"""``Batch``: one training batch of a DLRM-style model, at TorchRec's path
(``torchrec.datasets.utils``).

A batch is what ``DLRMTrain`` consumes and what a training pipeline moves to the device ahead
of use: so besides its three fields it has the ``Pipelineable`` methods (``to``,
``record_stream``) and ``pin_memory`` (a pinned host batch copies to the GPU asynchronously).
TorchRec's data-pipe helpers for reading files (train/validation splits, CSV readers) are not
here.
"""

from dataclasses import dataclass

import torch

from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """Dense features, sparse features and labels of ``B`` samples.

    Args:
        dense_features: ``[B, num_dense]`` float tensor.
        sparse_features: the sparse ids, one feature per key, batch size ``B``.
        labels: ``[B]`` tensor of 0/1 click labels (any dtype; ``DLRMTrain`` casts to float).
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """A new batch with every tensor on ``device`` (the fields are ``.to``'d, so a field
        already there is shared, not copied)."""
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Tell the caching allocator that ``stream`` reads this batch's device memory, so it is
        not handed out again before that stream's queued work is done. Host tensors have no
        stream and are skipped."""
        for t in (self.dense_features, self.labels):
            if not t.is_cpu:
                t.record_stream(stream)
        self.sparse_features.record_stream(stream)

    def pin_memory(self) -> "Batch":
        """A copy in page-locked host memory (needs an accelerator to pin for)."""
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
        )


__all__ = ["Batch"]
