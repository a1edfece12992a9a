"""jaggedrec: Triton-accelerated embedding bags with TorchRec's sparse types."""

from .configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from .embedding_modules import EmbeddingBag, EmbeddingBagCollection
from .jagged_tensor import JaggedTensor
from .keyed_jagged_tensor import KeyedJaggedTensor
from .keyed_tensor import KeyedTensor

__version__ = "0.1.0"

__all__ = [
    "DataType",
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingConfig",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "PoolingType",
]
