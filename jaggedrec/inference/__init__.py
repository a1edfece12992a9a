"""Inference helpers at TorchRec's path (``torchrec.inference``)."""
