"""Buffers of a collection's fused optimizer: hyperparameters, step counts and state.

Kept flat beside the weights (one set per storage group), registered as buffers so that
``state_dict()`` carries them and training resumes exactly from a checkpoint.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from jaggedrec.ops.host_memory import advise_huge_pages
from jaggedrec.optim import FusedOptimizer
from jaggedrec.modules.table_layout import TableLayout


class FusedOptimizerState(nn.Module):
    """Buffers ``hparams`` (``[5]`` fp32: lr, eps, weight_decay, beta1, beta2; more with
    options, see ``FusedOptimizer.hyperparameters``), and per storage group ``<group>_step``
    (``[1]`` int64) and one buffer per optimizer state (``<group>_<name>``: ``[rows of all
    tables]`` row-wise or ``[W]`` element-wise, fp32 or the config's ``state_dtype``;
    row-wise Adagrad's COUNTER and COWCLIP counters ``<group>_counter`` ``[rows, 2]`` fp32,
    FBGEMM's ``prev_iter`` and ``row_counter``, also read as ``<group>_prev_iter`` and
    ``<group>_row_counter``).

    With a fused optimizer the tables' flat weights require no gradient: the backward updates
    them in place, and a compiled graph may mutate an input in its backward only if that input
    requires no gradient (torch 2.11's AOTAutograd refuses it with "a leaf Variable that
    requires grad is being used in an in-place operation"). What makes autograd run the
    collection's backward is then ``backward_trigger``, an empty parameter passed to every op
    call (as FBGEMM's fused embeddings do); its gradient is empty too, so that DDP and
    optimizers find nothing to do with it. It stays out of ``state_dict()``.
    """

    def __init__(self, layout: TableLayout, optimizer: Optional[FusedOptimizer],
                 device: Optional[torch.device]) -> None:
        super().__init__()
        self._optimizer = optimizer
        self._groups = [g.name for g in layout.groups]
        # stochastic rounding: each group's table dtype as the step reads it (hparams[7])
        self._rounding = {g.name: {torch.float16: 1.0, torch.bfloat16: 2.0}.get(g.dtype, 0.0) for g in layout.groups}
        if optimizer is None:
            return
        self.backward_trigger = nn.Parameter(torch.zeros(0, dtype=torch.float32, device=device))
        self.register_state_dict_post_hook(_drop_trigger)
        self.register_load_state_dict_pre_hook(_keep_trigger)
        # [5], or [6] with max_gradient (see jaggedrec.optim.fused)
        self.register_buffer("hparams", torch.empty(len(optimizer.hyperparameters(optimizer.lr)), dtype=torch.float32,
                                                    device=device))
        for g in layout.groups:
            self.register_buffer(f"{g.name}_step", torch.empty(1, dtype=torch.int64, device=device))
            rows = sum(layout.tables[t].rows for t in {layout.features[f].table for f in g.features})
            for name, per in optimizer.buffers:
                size = (rows,) if per == "row" else (rows, 2) if per == "row_pair" else (g.numel,)
                # state_dtype (fp16/bf16: stored rounded, stepped in fp32); the counters stay fp32
                dtype = torch.float32 if per == "row_pair" else optimizer.state_storage
                state = torch.empty(size, dtype=dtype, device=device)
                advise_huge_pages(state)
                self.register_buffer(f"{g.name}_{name}", state)

    @torch.no_grad()
    def reset(self) -> None:
        """Step 0, zero state, the config's hyperparameters."""
        if self._optimizer is None:
            return
        for name, buffer in self.named_buffers():
            if buffer.device.type != "meta":
                buffer.zero_()
        self.set_learning_rate(self._optimizer.lr)

    def set_learning_rate(self, lr: float) -> None:
        if self._optimizer is None:
            raise RuntimeError("this collection has no fused_optimizer")
        if not lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if self.hparams.device.type != "meta":
            with torch.no_grad():
                self.hparams.copy_(torch.tensor(self._optimizer.hyperparameters(lr), dtype=torch.float32))

    def __getattr__(self, name: str):
        # row-wise Adagrad's counters by FBGEMM's names: [rows] columns of <group>_counter
        for column, suffix in enumerate(("_prev_iter", "_row_counter")):
            if name.endswith(suffix) and f"{name[:-len(suffix)]}_counter" in self._buffers:
                return self._buffers[f"{name[:-len(suffix)]}_counter"][:, column]
        return super().__getattr__(name)

    def learning_rate(self) -> float:
        if self._optimizer is None:
            raise RuntimeError("this collection has no fused_optimizer")
        return float(self.hparams[0])

    def tensors(self, group: str) -> List[torch.Tensor]:
        """The op's ``optimizer_state`` for one group: ``[hparams, step, state1, state2,
        backward_trigger]``, or []."""
        if self._optimizer is None:
            return []
        states = [getattr(self, f"{group}_{name}") for name, _ in self._optimizer.buffers]
        while len(states) < 2:
            states.append(self.hparams.new_empty(0))
        hparams = self.hparams
        if self._optimizer.stochastic_rounding:  # [..., max_norm, table dtype code, seed]
            hparams = torch.cat([hparams[:7], hparams.new_tensor([self._rounding[group]]), hparams[8:]])
        return [hparams, getattr(self, f"{group}_step"), *states, self.backward_trigger]


def _drop_trigger(module: FusedOptimizerState, state_dict, prefix: str, local_metadata) -> None:
    state_dict.pop(f"{prefix}backward_trigger", None)


def _keep_trigger(module: FusedOptimizerState, state_dict, prefix: str, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs) -> None:
    """Checkpoints carry no trigger (see the class): let the loader copy the module's own onto itself."""
    state_dict.setdefault(f"{prefix}backward_trigger", module.backward_trigger.detach())
