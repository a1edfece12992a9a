"""jaggedrec's torch.library ops. Importing this package registers them."""

from jaggedrec.ops.pooled import pooled_embedding_bags, pooled_embedding_bags_backward
from jaggedrec.ops.quantized import quantized_embedding_bags
from jaggedrec.ops.sequence import sequence_embeddings, sequence_embeddings_backward

__all__ = ["pooled_embedding_bags", "pooled_embedding_bags_backward", "quantized_embedding_bags",
           "sequence_embeddings", "sequence_embeddings_backward"]
