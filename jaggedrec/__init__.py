"""jaggedrec: Triton-accelerated embedding collections with TorchRec's sparse types."""

from jaggedrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from jaggedrec.modules.embedding_modules import Embedding, EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection
from jaggedrec.sparse.jagged_tensor import JaggedTensor
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.sparse.jagged_tensor import KeyedTensor

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
