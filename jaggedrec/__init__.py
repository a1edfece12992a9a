"""jaggedrec: Triton-accelerated embedding collections with TorchRec's sparse types."""

from jaggedrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from jaggedrec.modules.embedding_modules import Embedding, EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection
from jaggedrec.sparse.jagged_tensor import JaggedTensor
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.sparse.jagged_tensor import KeyedTensor

__version__ = "0.1.0"

# Subpackages that `import jaggedrec` does not load (torch.distributed, the quantized ops),
# reachable as attributes all the same, as TorchRec's are: `jaggedrec.distributed.X` after
# a plain `import jaggedrec`.
_SUBPACKAGES = ("datasets", "distributed", "inference", "models", "modules", "ops", "optim", "quant", "sparse",
                "testing")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataType",
    "Embedding",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "PoolingType",
]
