"""Quantized inference: row-wise INT8, INT4 and FP16 tables (see ``rowwise.py``)."""

from jaggedrec.quant.embedding_modules import EmbeddingBagCollection, quantize_embeddings

__all__ = ["EmbeddingBagCollection", "quantize_embeddings"]
