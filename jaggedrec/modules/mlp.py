"""Multi-layer perceptrons at TorchRec's path (``torchrec.modules.mlp``): the dense towers of
DLRM (``jaggedrec.models.dlrm``).

Parameter names follow TorchRec's (``_mlp.{i}._linear.weight`` ...), so that state dicts load
across the two libraries.
"""

import inspect
from typing import Callable, List, Optional, Union

import torch
from torch import nn

from jaggedrec.modules.activation import SwishLayerNorm

Activation = Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


class Perceptron(nn.Module):
    """One layer: ``activation(x @ W.T + b)``.

    Args:
        in_size: input features ``I``.
        out_size: output features ``O``.
        bias: whether the linear map adds a bias.
        activation: a module or a tensor function applied to the linear map's output.
        device, dtype: of the weights.

    Shapes: input ``[*, I]``, output ``[*, O]``.
    """

    def __init__(self, in_size: int, out_size: int, bias: bool = True, activation: Activation = torch.relu,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._in_size, self._out_size = in_size, out_size
        self._linear: nn.Linear = nn.Linear(in_size, out_size, bias=bias, device=device, dtype=dtype)
        # a module activation is registered as a submodule (its parameters, if any, train)
        self._activation_fn: Activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._activation_fn(self._linear(input))


def _is_factory(fn: Callable) -> bool:
    """Whether ``fn`` can be called with no arguments (a module class or a factory), as
    opposed to a tensor function such as ``torch.relu``."""
    if isinstance(fn, type):
        return issubclass(fn, nn.Module)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins such as torch.relu have none
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def _layer_activation(activation, width: int, device: Optional[torch.device]) -> Activation:
    """The activation of one layer of ``width`` outputs: a fresh module from a factory or for
    ``"swish_layernorm"``; a module or tensor function given as is otherwise (a module given
    as an instance is shared by every layer, as in TorchRec)."""
    if activation == "swish_layernorm":
        return SwishLayerNorm(width, device=device)
    if isinstance(activation, nn.Module) or not _is_factory(activation):
        return activation
    made = activation()
    if not isinstance(made, nn.Module):
        raise ValueError(f"MLP: activation factory {activation!r} returned {type(made).__name__}, not an nn.Module")
    return made


class MLP(nn.Module):
    """A stack of ``Perceptron`` s: ``in_size -> layer_sizes[0] -> ... -> layer_sizes[-1]``.

    Args:
        in_size: input features ``I``.
        layer_sizes: each layer's output features; the last one is ``O``.
        bias: whether each linear map adds a bias.
        activation: ``"relu"``, ``"sigmoid"``, ``"swish_layernorm"`` (a ``SwishLayerNorm``
            per layer), a tensor function, a module (shared by all layers) or a no-argument
            callable returning a module (called once per layer).
        device, dtype: of the weights.
        activation_on_last: False leaves the last layer linear.

    Shapes: input ``[*, I]``, output ``[*, O]``.
    """

    def __init__(
        self,
        in_size: int,
        layer_sizes: List[int],
        bias: bool = True,
        activation: Union[str, Callable[[], nn.Module], nn.Module, Callable[[torch.Tensor], torch.Tensor]] = torch.relu,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
        activation_on_last: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(activation, str):
            named = {"relu": torch.relu, "sigmoid": torch.sigmoid, "swish_layernorm": "swish_layernorm"}
            if activation not in named:
                raise ValueError(f"MLP: activation {activation!r} is not one of {sorted(named)}; "
                                 f"pass a module or a function for others")
            activation = named[activation]
        widths = [in_size, *layer_sizes]
        layers = []
        for i, out in enumerate(layer_sizes):
            last = i == len(layer_sizes) - 1
            act = nn.Identity() if last and not activation_on_last else _layer_activation(activation, out, device)
            layers.append(Perceptron(widths[i], out, bias=bias, activation=act, device=device, dtype=dtype))
        self._mlp: nn.Sequential = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._mlp(input)


__all__ = ["MLP", "Perceptron"]
