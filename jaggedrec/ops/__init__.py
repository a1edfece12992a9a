"""jaggedrec's torch.library ops. Importing this package registers them."""

from .pooled import pooled_embedding_bags, pooled_embedding_bags_backward

__all__ = ["pooled_embedding_bags", "pooled_embedding_bags_backward"]
