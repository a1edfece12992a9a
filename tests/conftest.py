"""Test-session setup.

Without CUDA, the Triton kernels run under Triton's CPU interpreter. It must be switched on
before the kernels are defined; jaggedrec defines them on first use of the Triton path,
so setting it here, before any test runs, is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
