"""jaggedrec's torch.library ops. Importing this package registers them."""

from .pooled import pooled_embedding_bags, pooled_embedding_bags_backward
from .sequence import sequence_embeddings, sequence_embeddings_backward

__all__ = ["pooled_embedding_bags", "pooled_embedding_bags_backward", "sequence_embeddings",
           "sequence_embeddings_backward"]
