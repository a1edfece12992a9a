"""pytest plugin for the TorchRec conformance run (``run.sh``): makes TorchRec's test files
importable from a checkout and, with ``JAGGEDREC_SUITE=jaggedrec``, points TorchRec's sparse
types, table configs, ``EmbeddingBagCollection`` and ``EmbeddingCollection`` at jaggedrec's.

The test bodies are TorchRec's, unchanged: they import ``torchrec.sparse.jagged_tensor`` and
friends at collection time, and this plugin is loaded (``-p shim``) before any test file is
imported, so those imports already see jaggedrec's classes. TorchRec's own helpers that the
tests call (``jt_is_equal``, ``validate_keyed_jagged_tensor``, ``torchrec.fx.symbolic_trace``,
...) stay TorchRec's and are handed jaggedrec objects, which is what a
user who swaps the import meets too.
"""

from __future__ import annotations

import os

import torchrec
import torchrec.modules
import torchrec.sparse

# TorchRec's wheel ships without its tests packages; the test files import helpers from
# ``torchrec.sparse.tests.utils``, so those packages are looked up in the checkout as well.
_CHECKOUT = os.environ["TORCHREC_CHECKOUT"]
torchrec.sparse.__path__.append(os.path.join(_CHECKOUT, "torchrec", "sparse"))
torchrec.modules.__path__.append(os.path.join(_CHECKOUT, "torchrec", "modules"))
# ... and so are the packages the wheel leaves out that test files import (``torchrec.ir``)
torchrec.__path__.append(os.path.join(_CHECKOUT, "torchrec"))

# TorchScript tests, left out of the count on both sides: jaggedrec targets torch.export.
TORCHSCRIPT_MARKERS = ("torch.jit.script", "torch.jit.trace")


def _point_torchrec_at_jaggedrec() -> None:
    import torchrec.modules.embedding_configs as tr_configs
    import torchrec.modules.embedding_modules as tr_modules
    import torchrec.sparse.jagged_tensor as tr_jagged

    import jaggedrec

    for name in ("JaggedTensor", "KeyedJaggedTensor", "KeyedTensor"):
        setattr(tr_jagged, name, getattr(jaggedrec, name))
        setattr(torchrec, name, getattr(jaggedrec, name))
    for name in ("EmbeddingBagConfig", "EmbeddingConfig", "PoolingType", "DataType"):
        setattr(tr_configs, name, getattr(jaggedrec, name))
    for name in ("EmbeddingBagCollection", "EmbeddingCollection"):
        setattr(tr_modules, name, getattr(jaggedrec, name))
        setattr(torchrec, name, getattr(jaggedrec, name))
    import torchrec.modules.feature_processor_ as tr_fp
    import torchrec.modules.fp_embedding_modules as tr_fp_modules

    from jaggedrec.modules import feature_processor_, fp_embedding_modules

    for name in ("FeatureProcessor", "FeatureProcessorsCollection", "PositionWeightedModule",
                 "PositionWeightedModuleCollection"):
        setattr(tr_fp, name, getattr(feature_processor_, name))
    tr_fp_modules.FeatureProcessedEmbeddingBagCollection = fp_embedding_modules.FeatureProcessedEmbeddingBagCollection
    import torchrec.modules.mc_embedding_modules as tr_mc_modules
    import torchrec.modules.mc_modules as tr_mc

    from jaggedrec.modules import mc_embedding_modules, mc_modules

    for name in mc_modules.__all__:
        setattr(tr_mc, name, getattr(mc_modules, name))
    for name in mc_embedding_modules.__all__:
        setattr(tr_mc_modules, name, getattr(mc_embedding_modules, name))
    import torchrec.modules.hash_mc_evictions as tr_hash_ev
    import torchrec.modules.hash_mc_modules as tr_hash

    from jaggedrec.modules import hash_mc_evictions, hash_mc_modules

    tr_hash.HashZchManagedCollisionModule = hash_mc_modules.HashZchManagedCollisionModule
    for name in ("HashZchEvictionConfig", "HashZchEvictionModule", "HashZchEvictionPolicyName"):
        setattr(tr_hash_ev, name, getattr(hash_mc_evictions, name))
    # the dense building blocks and the DLRM models: every public name jaggedrec has
    import importlib

    for path in ("modules.mlp", "modules.crossnet", "modules.activation", "models.dlrm"):
        ours, theirs = importlib.import_module(f"jaggedrec.{path}"), importlib.import_module(f"torchrec.{path}")
        for name in ours.__all__:
            setattr(theirs, name, getattr(ours, name))


if os.environ.get("JAGGEDREC_SUITE") == "jaggedrec":
    _point_torchrec_at_jaggedrec()


def pytest_collection_modifyitems(config, items):
    """Mark the TorchScript tests (by their source), so that the report can leave them out."""
    import inspect

    import pytest

    for item in items:
        fn = getattr(item, "function", None)
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            source = ""
        if any(m in source for m in TORCHSCRIPT_MARKERS):
            item.add_marker(pytest.mark.torchscript)
            item.user_properties.append(("torchscript", "1"))
