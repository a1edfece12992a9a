"""Activation modules at TorchRec's path (``torchrec.modules.activation``)."""

from typing import List, Optional, Union

import torch
from torch import nn


class SwishLayerNorm(nn.Module):
    """``y = x * sigmoid(LayerNorm(x))``: a gated activation that normalizes before gating.

    Args:
        input_dims: the trailing dimensions the layer norm normalizes over (an int for the
            last one), as ``nn.LayerNorm``'s ``normalized_shape``.
        device: where the layer norm's affine parameters live.

    Shapes: input ``[..., *input_dims]``, output the same.
    """

    def __init__(self, input_dims: Union[int, List[int], torch.Size], device: Optional[torch.device] = None) -> None:
        super().__init__()
        # a Sequential, so that the parameters are named norm.0.weight / norm.0.bias
        self.norm: nn.Sequential = nn.Sequential(nn.LayerNorm(input_dims, device=device), nn.Sigmoid())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * self.norm(input)


__all__ = ["SwishLayerNorm"]
