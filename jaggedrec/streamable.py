"""The two interfaces a training pipeline relies on to move its inputs, at TorchRec's path
(``torchrec.streamable``).

A pipeline copies batch i+1 to the device on a side stream while batch i computes. For that
the batch must be able to move itself (``to``) and to tell the caching allocator which
streams use its memory (``record_stream``), so that the memory is not reused while the
compute stream still reads it. ``torch.Tensor``, ``JaggedTensor``, ``KeyedJaggedTensor`` and
``jaggedrec.datasets.utils.Batch`` all have both methods; the classes below only name the
contract, for user batches that want to declare it.
"""

import abc

import torch


class Multistreamable(abc.ABC):
    """An object whose memory may be used on a CUDA stream other than the one that made it."""

    @abc.abstractmethod
    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor inside as in use on ``stream`` (``torch.Tensor.record_stream``)."""


class Pipelineable(Multistreamable):
    """An input a training pipeline can move to the device ahead of use."""

    @abc.abstractmethod
    def to(self, device: torch.device, non_blocking: bool) -> "Pipelineable":
        """This object on ``device``. It may return ``self`` when nothing moves, so callers
        rebind: ``batch = batch.to(device)``."""
