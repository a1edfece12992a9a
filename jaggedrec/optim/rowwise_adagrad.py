"""``RowWiseAdagrad`` at TorchRec's path (``torchrec.optim.rowwise_adagrad``): a
``torch.optim`` optimizer that keeps one Adagrad accumulator per row of a ``[rows, dim]``
parameter instead of one per element.

For a parameter ``w`` with gradient ``g`` at step ``t`` (counting from 1), row by row::

    g = -g if maximize
    g = g + weight_decay * w
    sum += mean(g ** 2)                        # over the row's columns; one value per row
    w -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)

Every row steps, touched or not: with ``weight_decay == 0`` an untouched row (zero gradient)
keeps its weights and accumulator, so on dense gradients a step equals the fused row-wise
Adagrad (``jaggedrec.optim.fused.RowWiseAdagrad``), which updates only the touched rows.
With weight decay the untouched rows decay here and not there, as TorchRec's does against
FBGEMM's.

Applied in the backward with ``torch.distributed.optim._apply_optimizer_in_backward`` to a
collection's weights, the sharders fuse it (``jaggedrec.distributed.fused_params``):
the shards then step the fused row-wise Adagrad with this optimizer's ``lr``, ``eps`` and
``weight_decay``.

jaggedrec's collections keep their tables in flat, one-dimensional parameters, which have
no rows; this optimizer takes them (so that an in-backward optimizer can be attached before
sharding), but a step on a parameter of fewer than two dims raises a ValueError. Parameters of
more than two dims are rows of their trailing dims flattened.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch.optim import Optimizer


class RowWiseAdagrad(Optimizer):
    """Args:
        params: parameters (or parameter groups) of shape ``[rows, ...]``.
        lr: learning rate (default 1e-2).
        lr_decay: the rate at step ``t`` is ``lr / (1 + (t - 1) * lr_decay)`` (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
        initial_accumulator_value: each row's accumulator at the start (default 0).
        eps: added to the square root of the accumulator (default 1e-10).
        maximize: ascend instead of descend (default False).

    ``state[p]``: ``"step"`` (a float scalar tensor) and ``"sum"`` (``[rows, 1]``, ``p``'s dtype).
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False) -> None:
        for name, value in (("lr", lr), ("lr_decay", lr_decay), ("weight_decay", weight_decay),
                            ("initial_accumulator_value", initial_accumulator_value), ("eps", eps)):
            if not value >= 0.0:
                raise ValueError(f"RowWiseAdagrad: {name} must be >= 0, got {value}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, maximize=maximize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group["initial_accumulator_value"])

    def _init_state(self, p: torch.Tensor, initial: float) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        if p.dim() >= 2:
            state["sum"] = torch.full((p.shape[0], 1), initial, dtype=p.dtype, device=p.device)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def share_memory(self) -> None:
        """Move the accumulators to shared memory (for Hogwild-style training)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "sum" in self.state[p]:
                    self.state[p]["sum"].share_memory_()

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[torch.Tensor]:
        """One step of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                _check(p, index)
                state = self.state[p]
                if "sum" not in state:  # a group added after construction
                    self._init_state(p, group["initial_accumulator_value"])
                _step_rows(p, p.grad, state, group)
        return loss


def _check(p: torch.Tensor, index: int) -> None:
    if p.grad.is_sparse:
        raise ValueError(f"RowWiseAdagrad: parameter {index} has a sparse gradient; this optimizer takes dense "
                         f"gradients (a collection's fused RowWiseAdagrad updates the touched rows only)")
    if p.dim() < 2:
        raise ValueError(f"RowWiseAdagrad: parameter {index} has shape {list(p.shape)}, which has no rows; it needs "
                         f"[rows, dim]. A jaggedrec collection's flat weights take a row-wise Adagrad as "
                         f"fused_optimizer=jaggedrec.optim.RowWiseAdagrad(lr, eps=...) or, applied in the "
                         f"backward, when sharded")


def _step_rows(p: torch.Tensor, grad: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
    state["step"] += 1
    t = float(state["step"])
    rows = p.reshape(p.shape[0], -1)  # a view when p is contiguous; else a copy, written back below
    g = (-grad if group["maximize"] else grad).reshape(rows.shape)
    if group["weight_decay"] != 0:
        g = g.add(rows, alpha=group["weight_decay"])
    state["sum"].add_(g.square().mean(dim=1, keepdim=True))
    std = state["sum"].sqrt().add_(group["eps"])
    rows.addcdiv_(g, std, value=-group["lr"] / (1 + (t - 1) * group["lr_decay"]))
    if rows.data_ptr() != p.data_ptr():
        p.copy_(rows.view_as(p))


__all__ = ["RowWiseAdagrad"]
