"""Triton kernels and their launchers, installed as ``jaggedrec.kernels``.

Kernels know nothing about modules or configs: they take flat weights, per-feature
metadata tensors and a KJT's raw values and offsets.
"""
