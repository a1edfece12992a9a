"""Which path an op takes (the Triton kernels or torch, and on the torch path whether it may
read tensors on the host), and the inputs as both paths read them."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from jaggedrec.ops.op_args import OpBatch
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


def batch_inputs(values: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                 inverse_indices: Optional[torch.Tensor] = None) -> OpBatch:
    """The batch as both paths index it: dense 1-D tensors (the kernels compute addresses as if
    every stride were 1; a column of an ``[N, 3]`` batch, or an expanded stride-0 tensor, would
    be misread), offsets int32 or int64. A tensor that already is so is passed through; any
    other costs one copy. ``inverse_indices`` are passed as they are."""
    if offsets.dtype not in (torch.int32, torch.int64):
        offsets = offsets.long()
    return OpBatch(values.contiguous(), offsets.contiguous(),
                   None if per_sample_weights is None else per_sample_weights.contiguous(), inverse_indices)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def host_readable(*tensors: torch.Tensor) -> bool:
    """Real CPU tensors in eager mode: the torch path may read their sizes and a few of their
    values on the host, which costs nothing there and breaks no graph; elsewhere it keeps to
    static shapes. Called through this module (``backends.host_readable``) everywhere, so that
    a test can force the static-shape path on CPU by replacing it."""
    return (not torch.compiler.is_compiling() and all(t.device.type == "cpu" for t in tensors)
            # a plain tensor's type says it is real, faster than asking is_fake
            and all(type(t) in _PLAIN_TENSORS or not is_fake(t) for t in tensors))


_ARANGES: Dict[torch.dtype, torch.Tensor] = {}


def host_arange(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n]`` 0, 1, ..., n-1 on the CPU: a view of one kept tensor per dtype, grown as needed,
    so that batches and chunks of any size reuse it."""
    kept = _ARANGES.get(dtype)
    if kept is None or kept.shape[0] < n:
        kept = _ARANGES[dtype] = torch.arange(max(n, 2 * (0 if kept is None else kept.shape[0])), dtype=dtype)
    return kept[:n]
