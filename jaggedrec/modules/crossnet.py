"""Cross networks (DCN, DCN-v2 and variants) at TorchRec's path (``torchrec.modules.crossnet``).

Each layer crosses the current features ``x_l`` with the input ``x_0`` element-wise and adds a
residual; they differ in how ``x_l`` is mixed first. With ``N`` input features:

* ``CrossNet``: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``, ``W_l`` full ``[N, N]``.
* ``LowRankCrossNet``: ``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l``, ``W_l`` ``[N, r]``,
  ``V_l`` ``[r, N]``.
* ``VectorCrossNet``: ``x_{l+1} = x_0 (x_l . w_l) + b_l + x_l``, ``w_l`` ``[N]``: one scalar
  per sample and layer.
* ``LowRankMixtureCrossNet``: a gated mixture of low-rank experts
  ``E_i(x_l) = x_0 * (U_i g(C_i g(V_i x_l)) + b_l)`` (``g`` the activation), weighted by a
  softmax over per-expert linear gates of ``x_l``; with one expert, no gate.

Kernels are Xavier-normal, biases zero. The parameters carry TorchRec's names and shapes
(``kernels``, ``W_kernels``, ``bias`` ...) so that state dicts load across the two libraries;
they are created in the same order, so one seed gives the same weights in both. Shapes: input
``[B, N]``, output ``[B, N]``.
"""

from typing import Callable, Union

import torch
from torch import nn
from torch.nn import functional as F


def _xavier(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.xavier_normal_(torch.empty(*shape)))


def _zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


class CrossNet(nn.Module):
    """Full-rank cross layers (DCN). ``kernels[l]`` ``[N, N]``, ``bias[l]`` ``[N, 1]``.

    Args:
        in_features: ``N``.
        num_layers: cross layers.
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        self._num_layers = num_layers
        self.kernels: nn.ParameterList = nn.ParameterList([_xavier(in_features, in_features) for _ in range(num_layers)])
        self.bias: nn.ParameterList = nn.ParameterList([_zeros(in_features, 1) for _ in range(num_layers)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x0 = x = input
        for w, b in zip(self.kernels, self.bias):
            x = x0 * (F.linear(x, w) + b.squeeze(1)) + x
        return x


class LowRankCrossNet(nn.Module):
    """Low-rank cross layers (DCN-v2's ``W = W_l V_l``). ``W_kernels[l]`` ``[N, r]``,
    ``V_kernels[l]`` ``[r, N]``, ``bias[l]`` ``[N]``.

    Args:
        in_features: ``N``.
        num_layers: cross layers.
        low_rank: ``r`` (at least 1).
    """

    def __init__(self, in_features: int, num_layers: int, low_rank: int = 1) -> None:
        super().__init__()
        if low_rank < 1:
            raise ValueError(f"LowRankCrossNet: low_rank is {low_rank}; it must be at least 1")
        self._num_layers, self._low_rank = num_layers, low_rank
        self.W_kernels: nn.ParameterList = nn.ParameterList([_xavier(in_features, low_rank) for _ in range(num_layers)])
        self.V_kernels: nn.ParameterList = nn.ParameterList([_xavier(low_rank, in_features) for _ in range(num_layers)])
        self.bias: nn.ParameterList = nn.ParameterList([_zeros(in_features) for _ in range(num_layers)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x0 = x = input
        for w, v, b in zip(self.W_kernels, self.V_kernels, self.bias):
            x = x0 * (F.linear(F.linear(x, v), w) + b) + x
        return x


class VectorCrossNet(nn.Module):
    """Cross layers with a vector kernel (the original DCN's). ``kernels[l]`` ``[N, 1]``,
    ``bias[l]`` ``[N, 1]``.

    Args:
        in_features: ``N``.
        num_layers: cross layers.
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        self._num_layers = num_layers
        self.kernels: nn.ParameterList = nn.ParameterList([_xavier(in_features, 1) for _ in range(num_layers)])
        self.bias: nn.ParameterList = nn.ParameterList([_zeros(in_features, 1) for _ in range(num_layers)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x0 = x = input
        for w, b in zip(self.kernels, self.bias):
            x = x0 * (x @ w) + b.squeeze(1) + x  # x @ w: [B, 1], one weight per sample
        return x


class LowRankMixtureCrossNet(nn.Module):
    """A mixture of low-rank cross experts (DCN-v2's DCN-Mix). Per layer ``l`` and expert
    ``i``: ``U_kernels[l][i]`` ``[N, r]``, ``V_kernels[l][i]`` ``[r, N]``,
    ``C_kernels[l][i]`` ``[r, r]``; ``bias[l]`` ``[N, 1]``; ``gates[i]`` a bias-free
    ``Linear(N, 1)`` when there is more than one expert.

    Args:
        in_features: ``N``.
        num_layers: cross layers.
        num_experts: ``K`` (at least 1).
        low_rank: ``r`` (at least 1).
        activation: ``g``, applied after ``V`` and after ``C``.
    """

    def __init__(self, in_features: int, num_layers: int, num_experts: int = 1, low_rank: int = 1,
                 activation: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]] = torch.relu) -> None:
        super().__init__()
        if num_experts < 1 or low_rank < 1:
            raise ValueError(f"LowRankMixtureCrossNet: num_experts ({num_experts}) and low_rank ({low_rank}) "
                             f"must be at least 1")
        self._num_layers, self._num_experts, self._low_rank = num_layers, num_experts, low_rank
        self._in_features = in_features
        K, N, r = num_experts, in_features, low_rank
        self.U_kernels: nn.ParameterList = nn.ParameterList([_xavier(K, N, r) for _ in range(num_layers)])
        self.V_kernels: nn.ParameterList = nn.ParameterList([_xavier(K, r, N) for _ in range(num_layers)])
        self.bias: nn.ParameterList = nn.ParameterList([_zeros(N, 1) for _ in range(num_layers)])
        self.gates = nn.ModuleList([nn.Linear(N, 1, bias=False) for _ in range(K)]) if K > 1 else None
        self._activation = activation
        self.C_kernels: nn.ParameterList = nn.ParameterList([_xavier(K, r, r) for _ in range(num_layers)])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        g = self._activation
        x0 = x = input
        for u, v, c, b in zip(self.U_kernels, self.V_kernels, self.C_kernels, self.bias):
            experts = torch.stack([x0 * (F.linear(g(F.linear(g(F.linear(x, v[i])), c[i])), u[i]) + b.squeeze(1))
                                   for i in range(self._num_experts)], dim=2)  # [B, N, K]
            if self.gates is None:
                x = experts.squeeze(2) + x
            else:
                gate = torch.softmax(torch.cat([gate(x) for gate in self.gates], dim=1), dim=1)  # [B, K]
                x = (experts @ gate.unsqueeze(2)).squeeze(2) + x
        return x


__all__ = ["CrossNet", "LowRankCrossNet", "LowRankMixtureCrossNet", "VectorCrossNet"]
