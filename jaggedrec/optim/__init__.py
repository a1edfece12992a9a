"""Optimizers, laid out as ``torchrec.optim``.

* ``fused``: the fused optimizers a collection steps inside its backward (``SGD``,
  ``RowWiseAdagrad``, ``Adam``, ``Adagrad``, ``LarsSGD``, ``PartialRowWiseAdam``, ``LAMB``,
  ``PartialRowWiseLAMB``): pass one as ``fused_optimizer=``.
* ``keyed``: ``KeyedOptimizer``, ``KeyedOptimizerWrapper``, ``CombinedOptimizer``:
  optimizers whose state dicts are keyed by parameter name.
* ``optimizers``: ``in_backward_optimizer_filter``, the parameters a dense optimizer steps.
* ``rowwise_adagrad``: ``RowWiseAdagrad``, TorchRec's row-wise Adagrad as a ``torch.optim``
  optimizer.

``RowWiseAdagrad`` here is the fused config when given a learning rate first and TorchRec's
torch optimizer when given parameters first (see ``fused.py``).
"""

from jaggedrec.optim import fused, keyed, optimizers, rowwise_adagrad
from jaggedrec.optim.fused import (LAMB, SGD, Adagrad, Adam, FusedOptimizer, LarsSGD, PartialRowWiseAdam,
                                   PartialRowWiseLAMB, RowWiseAdagrad)
from jaggedrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from jaggedrec.optim.optimizers import in_backward_optimizer_filter

__all__ = ["Adagrad", "Adam", "LAMB", "PartialRowWiseLAMB", "CombinedOptimizer", "FusedOptimizer", "KeyedOptimizer", "KeyedOptimizerWrapper", "LarsSGD",
           "PartialRowWiseAdam", "RowWiseAdagrad",
           "SGD", "fused", "in_backward_optimizer_filter", "keyed", "optimizers", "rowwise_adagrad"]
