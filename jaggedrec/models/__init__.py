"""Reference models laid out as ``torchrec.models``: ``dlrm`` (DLRM and its DCN and projection
variants, and ``DLRMTrain``, which adds the loss)."""

from jaggedrec.models import dlrm

__all__ = ["dlrm"]
