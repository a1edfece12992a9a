"""jaggedrec's torch.library ops. Importing this package registers them.

Each op (``pooled.py``, ``sequence.py``, ``quantized.py``) keeps a flat schema, as torch.library
needs; below it the batch and a fused step travel as one object each (``op_args``), into the
torch path (``*_torch.py``) and the Triton glue (``*_triton.py``), which launches the kernels
(``jaggedrec.kernels``).

One name per concept, in the ops and the kernels:

* ``weights``: the flat ``[W]`` storage of every table of one dtype (``weights_ptr`` in a
  kernel). Nothing else is called weights.
* ``per_sample_weights``: the ``[N]`` per-id weights of a weighted KJT (``psw`` in kernel
  names and in short locals: ``psw_ptr``, ``HAS_PSW``, ``grad_psw``).
* ``values``: the ``[N]`` ids, key-major as in a KJT; ``offsets``: ``[K*B+1]`` bag starts;
  ``inverse_indices``: VBE's ``[F, B]`` bag slot of each sample (``vbe.py``). The four make
  an ``OpBatch``; ``batch_size`` is the count of bags (slots) per key.
* ``tables``: the per-dtype table description, a ``FeatureTables`` (``feature_tables.py``):
  the features one op call serves, where their tables lie in ``weights``, how they pool. An
  op's schema carries it encoded as an ``int[]`` (``FeatureTables.encode``), under the same
  name; the op decodes it first (``feature_tables``).
* ``meta``: the kernels' ``[F, META_FIELDS]`` int64 view of ``tables``, read by the named
  fields of ``kernels/common.py`` (``META_DIM``, ...).
* ``bad_ids``: the count of ids outside ``[0, rows)`` of their table, which the kernels skip:
  an op's ``[F]`` int64 second output (``bad_ids_ptr`` in a kernel, a per-bag tally inside
  it). A mask of such ids is ``bad``.
* ``FusedStep``: a fused optimizer step's ``optimizer`` (1 SGD, 2 row-wise Adagrad, 3 Adam),
  ``hparams``, ``step`` and ``state1``/``state2``.
* A *pass* (``pooled_plan.py``): the features of one dim whose keys differ, served by one
  call over their dim's *block* of tables. A *run* (``runs_torch.py``, ``runs_triton.py``):
  the ids (contributions) of one row, sorted together.
"""

from jaggedrec.ops.pooled import pooled_embedding_bags, pooled_embedding_bags_backward
from jaggedrec.ops.quantized import quantized_embedding_bags
from jaggedrec.ops.sequence import sequence_embeddings, sequence_embeddings_backward

__all__ = ["pooled_embedding_bags", "pooled_embedding_bags_backward", "quantized_embedding_bags",
           "sequence_embeddings", "sequence_embeddings_backward"]
