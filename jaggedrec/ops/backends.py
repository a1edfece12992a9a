"""Which path an op takes (the Triton kernels or torch), and the inputs as both paths read them."""

from __future__ import annotations

from typing import Optional

import torch

from jaggedrec.ops.registry import HAS_TRITON

BACKENDS = ("auto", "torch", "triton")


def use_kernels(backend: str, device: torch.device) -> bool:
    """Whether the op runs the Triton kernels for tensors on ``device``."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package")
        return True
    return HAS_TRITON and device.type == "cuda"


def check_storage(*storage: torch.Tensor) -> None:
    """The kernels index ``storage`` (flat weights, optimizer state) as dense ``[W]`` tensors and
    update it in place, so a strided one cannot be copied instead: it is refused."""
    for t in storage:
        if not t.is_contiguous():
            raise ValueError(f"the Triton kernels need contiguous flat tables and optimizer state, got a tensor "
                             f"of shape {tuple(t.shape)} and strides {t.stride()}")


def batch_inputs(values: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor]):
    """The batch as both paths index it: dense 1-D tensors (the kernels compute addresses as if
    every stride were 1; a column of an ``[N, 3]`` batch, or an expanded stride-0 tensor, would
    be misread), offsets int32 or int64. A tensor that already is so is passed through; any
    other costs one copy."""
    if offsets.dtype not in (torch.int32, torch.int64):
        offsets = offsets.long()
    return (values.contiguous(), offsets.contiguous(),
            None if per_sample_weights is None else per_sample_weights.contiguous())
