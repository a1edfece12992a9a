"""Embedding modules at TorchRec's paths: ``embedding_configs`` and ``embedding_modules``."""
