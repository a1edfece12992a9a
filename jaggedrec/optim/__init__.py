"""Optimizers at TorchRec's paths (``torchrec.optim``).

``SGD``, ``RowWiseAdagrad`` and ``Adam`` here are the fused optimizers a collection steps inside
its backward (``fused.py``): pass one as ``fused_optimizer=``.
"""

from jaggedrec.optim.fused import SGD, Adam, FusedOptimizer, RowWiseAdagrad

__all__ = ["Adam", "FusedOptimizer", "RowWiseAdagrad", "SGD"]
