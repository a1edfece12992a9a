"""``quantize_embeddings`` at TorchRec's path (``torchrec.inference.modules``): swap a model's
float embedding-bag collections for quantized ones (see ``jaggedrec.quant``)."""

from jaggedrec.quant.embedding_modules import quantize_embeddings

__all__ = ["quantize_embeddings"]
