"""Autotuning that drops the configs the installed Triton cannot build.

A Triton release can fail to build a kernel at some configs only (triton 3.6 could not lay out
the forward's bag loop at 32+ bags without bounds checks, which 3.9 built). Triton's autotuner
skips a config only for a few error types; any other build error, such as a failed MLIR pass,
ends the launch. Here every autotuned kernel checks its configs first: each is built for the
launch's constexprs and argument types, and one that does not build is dropped with a
``RuntimeWarning``, so that such a regression costs speed instead of the run. When no config
builds, the launch raises an error naming the kernel and the first failure.

The check is the autotuner's ``early_config_prune`` hook, which both places that choose a config
call: triton's autotuner in eager launches (once per tuning key), and torch.compile, which runs
the hook while tracing ``wrap_triton`` and hands inductor only the configs it returns (inductor,
too, gives up on a build error other than running out of resources). A lone config, which
triton launches without pruning, is checked by :class:`CheckedAutotuner` before the launch.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.autotuner import Autotuner

from .common import interpreting


def autotune(configs: List[triton.Config], key: List[str],
             keep: Optional[Callable[[triton.Config, dict], bool]] = None):
    """``triton.autotune(configs, key)``, pruned as above. Every constexpr that no config sets
    joins ``key``: each switch builds a different kernel, so each value is checked and tuned
    on its own (a config tuned with one value is never launched untested with another).
    ``keep(config, arguments)``, where given, says which configs a launch may take at all (by
    its arguments and constexprs, by name); the kernel's ``keep`` attribute holds it, for the
    tools that list what the library launches."""
    def decorator(fn):
        tuned = {name for config in configs for name in config.kwargs}
        switches = [p.name for p in getattr(fn, "params", ())  # the interpreter's functions have none
                    if p.is_constexpr and p.name not in tuned and p.name not in key]
        tuner = CheckedAutotuner(fn, fn.arg_names, configs, list(key) + switches, None, None,
                                 prune_configs_by={"early_config_prune": BuildCheck(fn, keep)})
        tuner.keep = keep
        return tuner
    return decorator


class CheckedAutotuner(Autotuner):
    """triton's autotuner, also checking a lone config. torch.compile accepts a subclass: its
    tracing reads the configs and the hook, and never calls ``run``."""

    def run(self, *args, **kwargs):
        if len(self.configs) == 1:  # triton launches a lone config without calling the hook
            self.early_config_prune(self.configs, dict(zip(self.arg_names, args)), **kwargs)
        return super().run(*args, **kwargs)


def build(fn, args, kwargs, config: triton.Config) -> None:
    """Compile ``fn`` at ``config`` without launching it. With real tensors the kernel lands in
    the JIT's cache, where the launch finds it; torch dtypes stand for 16-byte aligned tensors."""
    fn.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())


class BuildCheck:
    """The ``early_config_prune`` hook: the configs that build for this launch, remembered per
    constexprs and argument types."""

    def __init__(self, fn, keep=None):
        self.fn = fn
        self.keep = keep
        self.name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", repr(fn))
        self.constexprs = {p.name for p in getattr(fn, "params", ()) if p.is_constexpr}
        self.built: Dict[Tuple, List[triton.Config]] = {}

    def __call__(self, configs, named_args, **kwargs):
        if self.keep is not None:
            configs = [c for c in configs if self.keep(c, dict(named_args, **kwargs))]
        if interpreting():  # nothing is built
            return configs
        # eager launches pass the grid and warmup flag along with the keyword arguments
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        # what changes the build: constexprs' values, tensors' dtypes, other arguments' types
        # (an int's value changes it only through triton's specialisations, 1 and multiples of
        # 16, which would otherwise need a check per batch size)
        key = (tuple(v if k in self.constexprs else _kind(v) for k, v in named_args.items()),
               tuple((k, v if k in self.constexprs else _kind(v)) for k, v in kwargs.items()),
               tuple(map(_describe, configs)))
        if key not in self.built:
            self.built[key] = self._check(configs, [_stand_in(v) for v in named_args.values()],
                                          {k: _stand_in(v) for k, v in kwargs.items()})
        return self.built[key]

    def _check(self, configs, args, kwargs):
        if not configs:
            return configs
        try:
            triton.runtime.driver.active.get_current_target()
        except Exception:  # noqa: BLE001 - no GPU to build for (e.g. tracing on a CPU-only host)
            return configs
        kept, errors = [], []
        for config in configs:
            try:
                build(self.fn, args, kwargs, config)
                kept.append(config)
            except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the config is out
                errors.append((config, e))
        variant = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k in self.constexprs)
        if not kept:
            config, error = errors[0]
            raise RuntimeError(f"jaggedrec: kernel {self.name} builds at none of its {len(configs)} launch configs "
                               f"with triton {triton.__version__} ({variant}); at {_describe(config)}: "
                               f"{_first_line(error)}") from error
        for config, error in errors:
            warnings.warn(f"jaggedrec: kernel {self.name} does not build at config {_describe(config)} with triton "
                          f"{triton.__version__} ({variant}), launching without it: {_first_line(error)}",
                          RuntimeWarning)
        return kept


def _stand_in(value):
    """What the check builds with: the argument itself, or for a traced tensor its dtype and for
    a symbolic int a plain one (neither 1 nor a multiple of 16, which triton would specialise on)."""
    if isinstance(value, torch.Tensor) and is_fake(value):
        return value.dtype
    if isinstance(value, torch.SymInt):
        return 3
    return value


def _kind(value):
    if isinstance(value, torch.dtype):  # a stand-in for a tensor
        return value
    return value.dtype if isinstance(value, torch.Tensor) else type(value)


def _describe(config: triton.Config) -> str:
    return ", ".join([f"{k}={v}" for k, v in config.kwargs.items()] + [f"num_warps={config.num_warps}"])


def _first_line(error: Exception) -> str:
    # a CompilationError's text starts with the source position; its message comes after
    text = (getattr(error, "error_message", None) or str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
