"""Optimizers keyed by parameter name, at TorchRec's path (``torchrec.optim.keyed``).

A ``torch.optim`` state dict numbers parameters by their place in the param groups, which
differs between ranks of a sharded model and between plans. A ``KeyedOptimizer`` names them
instead, with the names its ``params`` dict gives::

    {"state": {"over.0.weight": {"step": tensor(3.), "sum": tensor(...)}, ...}}

and, after ``save_param_groups(True)``, ``"param_groups"``: each group's hyperparameters with
``"params"`` the sorted names of its parameters.

Loading is strict and in place: the optimizer must already hold state for the same parameters
(run ``init_state()`` or one step first), each parameter's entries must match in number, and
tensors are copied into the tensors already there (a ``ShardedTensor`` shard by shard), so a
checkpoint loader can fill ``state_dict()``'s tensors and hand them back.

* ``KeyedOptimizerWrapper(params, optim_factory)``: any ``torch.optim`` optimizer, built by
  ``optim_factory`` over ``params``' values, keyed by ``params``' names.
* ``CombinedOptimizer([(name, keyed optimizer), ...])``: several as one; its keys are
  ``"<name>.<key>"`` (a keyed optimizer given without a name keeps its keys).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
from torch import optim
from torch.distributed._shard.sharded_tensor import ShardedTensor

OptimizerFactory = Callable[[Any], optim.Optimizer]


class KeyedOptimizer(optim.Optimizer):
    """Args:
        params: name -> parameter (a tensor or ``ShardedTensor``).
        state: parameter -> its state dict; every key must be one of ``params``' values.
        param_groups: the groups, each a dict with ``"params"`` (a list of those parameters)
            and its hyperparameters.

    ``add_param_group`` is refused: the groups are fixed at construction.
    """

    def __init__(self, params: Mapping[str, Any], state: Mapping[Any, Any],
                 param_groups: Collection[Mapping[str, Any]]) -> None:
        self._init_optimizer_fields()
        self.defaults: Dict[str, Any] = {"_save_param_groups": False}
        self.params = params
        self.state = state
        self.param_groups = param_groups
        known = {id(p) for p in params.values()}
        strangers = [k for k in state if id(k) not in known]
        if strangers:
            raise ValueError(f"{type(self).__name__}: {len(strangers)} state keys are not among the params "
                             f"({[tuple(getattr(k, 'shape', ())) for k in strangers[:4]]}...)")

    def _init_optimizer_fields(self) -> None:
        """What ``torch.optim.Optimizer``'s methods read, without its ``__init__`` (which adds
        the groups one by one through ``add_param_group``)."""
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()

    # --- state_dict ----------------------------------------------------------------------
    def _keys(self) -> Dict[int, str]:
        return {id(p): key for key, p in self.params.items()}

    def state_dict(self) -> Dict[str, Any]:
        """``{"state": {name: {entry: value}}}`` (values with a ``state_dict()`` give theirs),
        and ``"param_groups"`` when ``save_param_groups(True)``."""
        keys = self._keys()
        out: Dict[str, Any] = {"state": {keys[id(p)]: _plain(s) for p, s in self.state.items()}}
        if self.defaults["_save_param_groups"]:
            out["param_groups"] = [
                {**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
                 "params": sorted(keys[id(p)] for p in g["params"])} for g in self.param_groups]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy ``state_dict`` (as ``state_dict()`` gives it) into this optimizer's state, in
        place; ValueError when the parameters or their entries differ."""
        theirs = state_dict["state"]
        if len(self.state) != len(theirs):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the optimizer holds state for {len(self.state)} "
                             f"parameters, the state dict for {len(theirs)} (step once, or init_state(), first)")
        for key, p in self.params.items():
            if p not in self.state:
                continue
            if key not in theirs:
                raise ValueError(f"{type(self).__name__}.load_state_dict: no state for parameter '{key}'")
            if len(self.state[p]) != len(theirs[key]):
                raise ValueError(f"{type(self).__name__}.load_state_dict: parameter '{key}' has "
                                 f"{sorted(self.state[p])} here, {sorted(theirs[key])} in the state dict")
            _load_into(self.state[p], theirs[key], key)
        if self.defaults["_save_param_groups"]:
            self._load_param_groups(state_dict["param_groups"])
        self.post_load_state_dict()

    def _load_param_groups(self, groups: List[Mapping[str, Any]]) -> None:
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: {len(self.param_groups)} param groups here, "
                             f"{len(groups)} in the state dict")
        keys = self._keys()
        theirs = {"/".join(sorted(g["params"])): g for g in groups}
        for group in self.param_groups:
            name = "/".join(sorted(keys[id(p)] for p in group["params"]))
            if name not in theirs:
                raise ValueError(f"{type(self).__name__}.load_state_dict: no param group of parameters {name}")
            if set(group) != set(theirs[name]):
                raise ValueError(f"{type(self).__name__}.load_state_dict: param group {name} has {sorted(group)} "
                                 f"here, {sorted(theirs[name])} in the state dict")
            for k, v in theirs[name].items():
                if k != "params":
                    group[k] = copy.deepcopy(v)

    def post_load_state_dict(self) -> None:
        """Called after ``load_state_dict``; subclasses refresh what they derive from the state."""

    def save_param_groups(self, save: bool) -> None:
        """Include ``param_groups`` in ``state_dict()`` (and expect them in ``load_state_dict``)."""
        self.defaults["_save_param_groups"] = save

    # --- the rest ------------------------------------------------------------------------
    def add_param_group(self, param_group: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}: the param groups are fixed at construction")

    def init_state(self, sparse_grad_parameter_names: Optional[Set[str]] = None) -> None:
        """Make the (typically lazy) state by one step on zero gradients, so that a checkpoint
        can be loaded into it; the parameters named in ``sparse_grad_parameter_names`` get a
        sparse zero gradient."""
        sparse = sparse_grad_parameter_names or set()
        for key, p in self.params.items():
            if p.requires_grad:
                zero = torch.zeros_like(p)
                p.grad = zero.to_sparse() if key in sparse else zero
        self.step(closure=None)

    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__


class KeyedOptimizerWrapper(KeyedOptimizer):
    """``optim_factory`` applied to ``params``' values (or to ``params`` itself when
    ``pass_params_dict``), keyed by ``params``' names: its state and param groups are the
    built optimizer's own objects."""

    def __init__(self, params: Mapping[str, Any], optim_factory: OptimizerFactory,
                 pass_params_dict: bool = False) -> None:
        self._optimizer = optim_factory(params if pass_params_dict else list(params.values()))
        super().__init__(params, self._optimizer.state, self._optimizer.param_groups)

    @property
    def optimizer(self) -> optim.Optimizer:
        return self._optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        return self._optimizer.step(closure=closure)

    def set_optimizer_step(self, step: int) -> None:
        if hasattr(self._optimizer, "set_optimizer_step"):
            self._optimizer.set_optimizer_step(step)

    def update_hyper_parameters(self, params_dict: Dict[str, Any]) -> None:
        if hasattr(self._optimizer, "update_hyper_parameters"):
            self._optimizer.update_hyper_parameters(params_dict)


class CombinedOptimizer(KeyedOptimizer):
    """Several keyed optimizers stepped, zeroed, saved and loaded as one.

    Args:
        optims: keyed optimizers, each alone or as ``(name, optimizer)``; the combined keys
            are ``"<name>.<key>"`` (``<key>`` alone without a name, ``<name>`` alone for an empty
            key) and must not repeat (ValueError).
    """

    def __init__(self, optims: List[Union[KeyedOptimizer, Tuple[str, KeyedOptimizer]]]) -> None:
        self._init_optimizer_fields()
        self._optims: List[Tuple[str, KeyedOptimizer]] = [o if isinstance(o, tuple) else ("", o) for o in optims]
        for name, o in self._optims:
            if not isinstance(o, KeyedOptimizer):
                raise TypeError(f"CombinedOptimizer: '{name}' is a {type(o).__name__}, not a KeyedOptimizer "
                                f"(wrap a torch optimizer in KeyedOptimizerWrapper)")
        saving = {o.defaults["_save_param_groups"] for _, o in self._optims}
        if len(saving) > 1:
            raise ValueError("CombinedOptimizer: its optimizers disagree on save_param_groups")
        self.defaults = {"_save_param_groups": saving.pop() if saving else False}
        seen: Set[str] = set()
        for name, o in self._optims:
            for key in o.params:
                full = self.prepend_opt_key(key, name)
                if full in seen:
                    raise ValueError(f"CombinedOptimizer: parameter key '{full}' appears twice")
                seen.add(full)

    @staticmethod
    def prepend_opt_key(name: str, opt_key: str) -> str:
        """The combined key of parameter ``name`` in the optimizer named ``opt_key``."""
        if not name:
            return opt_key
        return f"{opt_key}.{name}" if opt_key else name

    @property
    def optimizers(self) -> List[Tuple[str, KeyedOptimizer]]:
        return self._optims

    @property
    def params(self) -> Dict[str, Any]:
        return {self.prepend_opt_key(key, name): p for name, o in self._optims for key, p in o.params.items()}

    @property
    def state(self) -> Dict[Any, Any]:
        return {p: s for _, o in self._optims for p, s in o.state.items()}

    @property
    def param_groups(self) -> List[Mapping[str, Any]]:
        return [g for _, o in self._optims for g in o.param_groups]

    def __repr__(self) -> str:
        return ",".join(f"{name}: {o!r}" for name, o in self._optims)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, o in self._optims:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        for _, o in self._optims:
            o.step(closure=closure)

    def post_load_state_dict(self) -> None:
        for _, o in self._optims:
            o.post_load_state_dict()

    def save_param_groups(self, save: bool) -> None:
        self.defaults["_save_param_groups"] = save
        for _, o in self._optims:
            o.save_param_groups(save)

    def set_optimizer_step(self, step: int) -> None:
        for _, o in self._optims:
            if hasattr(o, "set_optimizer_step"):
                o.set_optimizer_step(step)

    def update_hyper_parameters(self, params_dict: Dict[str, Any]) -> None:
        for _, o in self._optims:
            if hasattr(o, "update_hyper_parameters"):
                o.update_hyper_parameters(params_dict)


def _plain(entries: Mapping[str, Any]) -> Dict[str, Any]:
    """A parameter's state with every value that has a ``state_dict()`` replaced by it."""
    out = {}
    for k, v in entries.items():
        if isinstance(v, Mapping):
            out[k] = _plain(v)
        elif callable(getattr(v, "state_dict", None)):
            out[k] = v.state_dict()
        else:
            out[k] = v
    return out


def _load_into(ours: Dict[str, Any], theirs: Mapping[str, Any], path: str) -> None:
    for k, v in ours.items():
        if k not in theirs:
            raise ValueError(f"load_state_dict: '{path}' has no entry '{k}' in the state dict")
        new = theirs[k]
        where = f"{path}.{k}"
        if isinstance(v, dict):
            _load_into(v, new, where)
        elif callable(getattr(v, "load_state_dict", None)):
            v.load_state_dict(new)
        elif isinstance(v, ShardedTensor):
            _load_shards(v, new, where)
        elif isinstance(v, torch.Tensor):
            if tuple(v.shape) != tuple(new.shape):
                raise ValueError(f"load_state_dict: '{where}' has shape {list(v.shape)}, the state dict "
                                 f"{list(new.shape)}")
            v.detach().copy_(new)
        else:
            ours[k] = copy.deepcopy(new)


def _load_shards(ours: ShardedTensor, theirs: Any, where: str) -> None:
    if not isinstance(theirs, ShardedTensor):
        raise ValueError(f"load_state_dict: '{where}' is a ShardedTensor here, a {type(theirs).__name__} in the "
                         f"state dict")
    mine, given = ours.local_shards(), theirs.local_shards()
    if len(mine) != len(given):
        raise ValueError(f"load_state_dict: '{where}' has {len(mine)} local shards here, {len(given)} in the "
                         f"state dict")
    for a, b in zip(mine, given):
        if a.tensor.shape != b.tensor.shape:
            raise ValueError(f"load_state_dict: '{where}' shard at {a.metadata.shard_offsets} is "
                             f"{list(a.tensor.shape)} here, {list(b.tensor.shape)} in the state dict")
        a.tensor.detach().copy_(b.tensor)


__all__ = ["CombinedOptimizer", "KeyedOptimizer", "KeyedOptimizerWrapper", "OptimizerFactory"]
