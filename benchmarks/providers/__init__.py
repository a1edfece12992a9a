"""The implementations under test ("providers"), each built from the same reference tables,
and the lineups the benchmarks run.

- ``base``: the :class:`Provider` interface (and :class:`EcProvider`, one row per id);
- ``loops``: plain torch, the baselines (a loop of ``nn.EmbeddingBag`` or ``nn.Embedding``);
- ``jaggedrec``: jaggedrec's collections on each backend, compiled, on VBE batches;
- ``peers``: TorchRec's collections and FBGEMM's table-batched embeddings, where installed;
- ``quant``: quantized tables (``--dtype int8|int4``) against the fp32 module;
- ``sharded``: over N ranks (``--world-size N``), against the unsharded module.

The lineups below are the default ``--providers`` in report order, the baseline first.
"""

from typing import List

from .base import EcProvider, Provider
from .jaggedrec import CompiledJaggedrec, Jaggedrec, JaggedrecEC, JaggedrecVbe
from .loops import CompiledEmbeddingBagLoop, EmbeddingBagConcat, EmbeddingBagLoop, EmbeddingLoop
from .peers import FbgemmInferenceTBENone, FbgemmTBE, FbgemmTBENone, TorchRecEBC, TorchRecEC
from .quant import quant_providers


def all_providers() -> List[Provider]:
    """The bag collection's providers; the ``eb_loop`` baseline first."""
    return [EmbeddingBagLoop(), EmbeddingBagConcat(), CompiledEmbeddingBagLoop(), Jaggedrec("torch"),
            Jaggedrec("triton"), CompiledJaggedrec(), JaggedrecVbe(), TorchRecEBC(), FbgemmTBE()]


def ec_providers() -> List[Provider]:
    """``--module ec``'s providers; the ``embedding_loop`` baseline first."""
    return [EmbeddingLoop(), JaggedrecEC("torch"), JaggedrecEC("triton"), TorchRecEC(), FbgemmTBENone(),
            FbgemmInferenceTBENone()]


__all__ = ["EcProvider", "EmbeddingBagLoop", "EmbeddingLoop", "Provider", "all_providers", "ec_providers",
           "quant_providers"]
