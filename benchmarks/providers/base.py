"""What every provider is: one implementation under test, built from the reference tables.

Every provider turns the reference ``[rows, dim]`` tables into its own module, then runs
one step on a :class:`~jaggedrec.benchmarks.workload.Batch`:

- ``forward`` mode: the forward under ``torch.no_grad()`` (inference);
- ``backward`` mode: forward, then backward of the given ``[B, total_dim]`` output gradient
  into dense weight gradients;
- ``train`` mode: a training step with SGD (lr 0.01), sparse gradients where the provider
  has them.

``forward(batch)`` returns the ``[B, total_dim]`` pooled output (features ``f0, f1, ...``
side by side) that the runner compares against the baseline before timing. A provider names
why it can't run here in ``skip_reason`` instead of failing later. :class:`EcProvider` is the
unpooled lookup's (``--module ec``): one row per id.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..workload import Batch, Workload

LEARNING_RATE = 0.01
# torch.compile of a loop unrolls one op per table; past this, compile time dwarfs the run.
COMPILE_MAX_TABLES = 64

# How far an output may be from the baseline's, ``(abs, rel, what abs is)``: it passes where
# ``|out - ref| <= f * abs + rel * |ref|``, abs a number or a tensor that broadcasts to the
# output (a bound per element), f the provider's ``tolerance_factor``
Tolerance = Tuple[Union[float, torch.Tensor], float, str]


class Provider:
    """Base class: one implementation, set up for one workload."""

    name = ""
    description = ""
    # times the module's abs tolerance this provider's output may be off by: more than 1 for a
    # peer whose quantized rows round their own way (quant.py)
    tolerance_factor = 1.0

    def __init__(self) -> None:
        self.module: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.mode = "forward"
        self.note = ""  # what this provider does differently in this mode, shown in reports

    #: the --optimizer names its train mode can step (``workload.OPTIMIZERS``)
    optimizers: Sequence[str] = ("exact_sgd",)

    def skip_reason(self, w: Workload) -> Optional[str]:
        """Why this provider can't run ``w`` here, or None."""
        return None

    def build(self, tables: Sequence[torch.Tensor], w: Workload) -> None:
        """Make ``self.module`` from ``tables`` (``[rows, dim]`` each, copied, not aliased)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """``[B, total_dim]`` pooled output (any float dtype)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> None:
        """One timed step of ``self.mode``."""
        if self.mode == "forward":
            with torch.no_grad():
                self.forward(batch)
            return
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.clear_grads()
        out = self.forward(batch)
        out.backward(batch.grad_out if out.dtype == torch.float32 else batch.grad_out.to(out.dtype))
        if self.mode == "train" and self.optimizer is not None:
            self.optimizer.step()

    def grad_params(self) -> List[torch.Tensor]:
        """Parameters that receive weight gradients in backward mode (for the gradient check)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def clear_grads(self) -> None:
        if self.module is not None:
            for p in self.module.parameters():
                p.grad = None

    def table_bytes(self) -> int:
        """Bytes of the provider's parameters and buffers (its tables as it stores them)."""
        return storage_bytes([*self.module.parameters(), *self.module.buffers()])

    def state_bytes(self) -> int:
        """Bytes of the provider's parameters, buffers and optimizer state (each storage once)."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        if self.optimizer is not None:
            tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return storage_bytes(tensors)

    def release(self) -> None:
        self.module = self.optimizer = None


def storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the storages under ``tensors``, each once (views share one)."""
    seen, total = set(), 0
    for t in tensors:
        # a wrapper subclass (TorchRec's UInt4Tensor) has no storage of its own: count what it wraps
        t = t.elem if torch.is_tensor(getattr(t, "elem", None)) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and t.device.type != "meta":
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def feature_slices(batch: Batch, num_features: int, batch_size: int, dtype: torch.dtype):
    """Per feature: ``[N_f]`` ids, ``[B+1]`` offsets from 0, ``[N_f]`` weights in ``dtype`` or None.

    The feature boundaries come from the batch's host-side ``key_offsets``, as a data loader
    can provide them, so the loop pays no device-to-host read: the strongest fair baseline.
    """
    ids, offsets, weights = [], [], []
    for f in range(num_features):
        first, last = batch.key_offsets[f], batch.key_offsets[f + 1]
        ids.append(batch.values[first:last])
        offsets.append(batch.offsets[f * batch_size:(f + 1) * batch_size + 1] - first)
        weights.append(None if batch.weights is None else batch.weights[first:last].to(dtype))
    return ids, offsets, weights


class EcProvider(Provider):
    """An unpooled lookup, set up for one workload. On an :class:`~.workload.EcBatch`:

    - ``rows(batch)``: per feature ``f0, f1, ...``, its ``[N_f, dim_f]`` rows (one per id);
    - ``forward(batch)``: those rows flattened and concatenated, ``[sum_f N_f * dim_f]``: what
      the runner checks against the ``nn.Embedding`` loop (mixed dims allow no one matrix).
      Only the checks call it, so its copy is never timed;
    - ``step(batch)``: as :meth:`Provider.step`, with ``rows`` and the per-feature gradients.
    """

    def rows(self, batch: Batch) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch):
        return torch.cat([r.reshape(-1) for r in self.rows(batch)])

    def step(self, batch: Batch) -> None:
        if self.mode == "forward":
            with torch.no_grad():
                self.rows(batch)
            return
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.clear_grads()
        outs = self.rows(batch)
        grads = batch.grads
        if outs and outs[0].dtype != grads[0].dtype:  # TorchRec's module upcasts fp16 rows to fp32
            grads = [g.to(outs[0].dtype) for g in grads]
        torch.autograd.backward(outs, grads)
        if self.mode == "train" and self.optimizer is not None:
            self.optimizer.step()
