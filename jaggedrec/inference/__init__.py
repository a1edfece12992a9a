"""Inference helpers at TorchRec's paths (``torchrec.inference``): ``modules``
(quantize_embeddings) and ``state_dict_transform``."""

from jaggedrec.inference import modules, state_dict_transform

__all__ = ["modules", "state_dict_transform"]
