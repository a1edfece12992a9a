"""Data sets laid out as ``torchrec.datasets``.

* ``utils``: ``Batch``, the (dense features, sparse KJT, labels) triple a DLRM trains on.
* ``random``: ``RandomRecDataset``, seeded random batches of that shape.
* ``criteo``: the Criteo data set's column names and counts (the readers are not here).
"""

from jaggedrec.datasets import criteo, random, utils

__all__ = ["criteo", "random", "utils"]
