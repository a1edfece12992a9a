"""``DistributedModelParallel``: shard every embedding collection of a model, data-parallel
for the rest.

Given a model (each rank builds the same one, as after seeding), it plans (or takes a plan),
replaces each planned collection by its sharded module, and wraps the model in
``DistributedDataParallel`` with the sharded modules' parameters and buffers left out:
their gradients never mix across ranks, while the dense parameters' gradients are averaged.
Keys of ``state_dict()`` and ``named_parameters()`` are the unwrapped model's.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, as_keyed_jagged_tensor
from jaggedrec.distributed.planner import EmbeddingShardingPlanner, Topology
from jaggedrec.distributed.sharding_plan import get_default_sharders
from jaggedrec.distributed.types import ShardingEnv, ShardingPlan


class DistributedModelParallel(nn.Module):
    """Args:
        module: the model; every collection the plan names is sharded in place.
        env: the ranks (default: the default process group's).
        device: where the shards and the rest of the model live (default CPU).
        plan: a ``ShardingPlan`` (default: ``EmbeddingShardingPlanner.collective_plan``).
        sharders: one per collection type (default: ``get_default_sharders()``).
        init_data_parallel: wrap the rest of the model in ``DistributedDataParallel``.
    """

    def __init__(self, module: nn.Module, env: Optional[ShardingEnv] = None, device: Optional[torch.device] = None,
                 plan: Optional[ShardingPlan] = None, sharders: Optional[list] = None,
                 init_data_parallel: bool = True) -> None:
        super().__init__()
        if env is None:
            if not dist.is_initialized():
                raise RuntimeError("DistributedModelParallel needs torch.distributed.init_process_group first "
                                   "(or an env)")
            env = ShardingEnv.from_process_group(dist.group.WORLD)
        device = torch.device(device) if device is not None else torch.device("cpu")
        sharders = list(sharders) if sharders is not None else get_default_sharders()
        if plan is None:
            planner = EmbeddingShardingPlanner(topology=Topology(world_size=env.world_size,
                                                                 compute_device=device.type))
            plan = planner.collective_plan(module, sharders, env.process_group)
        self._env, self.plan, self._sharders = env, plan, sharders
        model = _shard(module, plan, sharders, env, device)
        model.to(device)
        self._sharded_paths = [path for path in plan.plan]
        self._dmp_wrapped_module = self._wrap(model) if init_data_parallel else model

    def _wrap(self, model: nn.Module) -> nn.Module:
        sharded = {path: m for path, m in model.named_modules() if _is_sharded(m)}
        ignore = [f"{path}.{name}" if path else name for path, m in sharded.items()
                  for name, _ in list(m.named_parameters()) + list(m.named_buffers())]
        ignored = set(ignore)
        dense = [n for n, p in model.named_parameters() if p.requires_grad and n not in ignored]
        if not dense or self._env.process_group is None:
            return model
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return DistributedDataParallel(model, process_group=self._env.process_group)

    @property
    def module(self) -> nn.Module:
        """The sharded model, without the DDP wrapper."""
        wrapped = self._dmp_wrapped_module
        return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped

    def forward(self, *args, **kwargs):
        """The model's forward; a TorchRec ``KeyedJaggedTensor`` among the arguments reaches the
        model as jaggedrec's, holding the same tensors."""
        args = tuple(_as_ours(a) for a in args)
        kwargs = {k: _as_ours(v) for k, v in kwargs.items()}
        return self._dmp_wrapped_module(*args, **kwargs)

    @property
    def fused_optimizer(self) -> Dict[str, object]:
        """Per sharded collection path, its fused optimizer (collections without one are left out)."""
        out = {}
        for path, m in self.module.named_modules():
            if _is_sharded(m) and m.fused_optimizer is not None:
                out[path] = m.fused_optimizer
        return out

    # the unwrapped model's names, as an unsharded model has them
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        return self.module.named_buffers(prefix, recurse, remove_duplicate)


def _as_ours(arg):
    """A KeyedJaggedTensor of another library (TorchRec's, by its class name) as jaggedrec's."""
    if not isinstance(arg, KeyedJaggedTensor) and any(c.__name__ == "KeyedJaggedTensor" for c in type(arg).__mro__):
        return as_keyed_jagged_tensor(arg)
    return arg


def _is_sharded(m: nn.Module) -> bool:
    return hasattr(m, "_input_dists") and hasattr(m, "_lookups")


def _shard(module: nn.Module, plan: ShardingPlan, sharders: List, env: ShardingEnv,
           device: torch.device) -> nn.Module:
    """Replace each collection the plan names by its sharded module; returns the model (a new
    object only when the model itself is a planned collection)."""
    for path, module_plan in plan.plan.items():
        target = module.get_submodule(path) if path else module
        sharder = next((s for s in sharders if isinstance(target, s.module_type)), None)
        if sharder is None:
            raise ValueError(f"the plan names '{path or '<model>'}' ({type(target).__name__}), which no sharder "
                             f"shards (sharders: {[type(s).__name__ for s in sharders]})")
        sharded = sharder.shard(target, module_plan, env, device)
        if not path:
            return sharded
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, sharded)
    return module
