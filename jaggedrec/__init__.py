"""jaggedrec: Triton-accelerated embedding collections with TorchRec's sparse types."""

from .configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from .embedding_modules import Embedding, EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection
from .jagged_tensor import JaggedTensor
from .keyed_jagged_tensor import KeyedJaggedTensor
from .keyed_tensor import KeyedTensor

__version__ = "0.1.0"

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
