"""Sparse types with TorchRec's API (see ``jagged_tensor``)."""

from jaggedrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = ["JaggedTensor", "KeyedJaggedTensor", "KeyedTensor"]
