"""From a sharded model's state to one process's, at TorchRec's path
(``torchrec.inference.state_dict_transform``): a sharded collection's ``state_dict()`` holds
``ShardedTensor``s of this rank's shards; these functions move them and gather them whole,
for a model that runs in one process (an index, an exported inference model).

Both are collective: every rank of the group calls them, with its own state dict.
"""

from __future__ import annotations

from typing import Dict, List, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards

StateDict = Dict[str, Union[torch.Tensor, ShardedTensor]]


def state_dict_gather(src: StateDict, dst: Dict[str, torch.Tensor]) -> None:
    """Fill rank 0's ``dst`` from every rank's ``src``, for the keys ``dst`` has.

    Args:
        src: this rank's state dict (plain tensors and ``ShardedTensor``s).
        dst: rank 0's state dict to fill in place (e.g. an unsharded model's ``state_dict()``,
            whose tensors are the model's); the other ranks pass theirs too, with the same
            keys, and it is left as it is.

    A ``ShardedTensor`` is gathered whole onto rank 0 (a collective); a plain tensor (a
    replicated table, a dense layer) is copied on every rank. ValueError for any other value.
    """
    for key, target in dst.items():
        value = src[key]
        if isinstance(value, ShardedTensor):
            value.gather(dst=0, out=target if dist.get_rank() == 0 else None, dtype=target.dtype)
        elif isinstance(value, torch.Tensor):
            target.copy_(value)
        else:
            raise ValueError(f"state_dict_gather: '{key}' is a {type(value).__name__}, not a tensor or ShardedTensor")


def state_dict_to_device(state_dict: StateDict, pg: dist.ProcessGroup, device: torch.device) -> StateDict:
    """``state_dict`` with every tensor on ``device``: plain tensors moved, ``ShardedTensor``s
    rebuilt over ``pg`` from their local shards moved. A ``ShardedTensor`` key of another
    rank's state dict that this rank lacks gets one with no local shard. ValueError for a
    value that is neither."""
    device = torch.device(device)
    rank = dist.get_rank(pg)
    mine = {key: (_global_size(key, value), isinstance(value, ShardedTensor)) for key, value in state_dict.items()}
    everyone: List[Dict[str, Tuple[Tuple[int, ...], bool]]] = [{} for _ in range(dist.get_world_size(pg))]
    dist.all_gather_object(everyone, mine, group=pg)
    seen = {key: kind for theirs in everyone for key, kind in theirs.items()}
    out: StateDict = {}
    for key in sorted(seen):
        value = state_dict.get(key)
        size, sharded = seen[key]
        if value is None and not sharded:
            continue  # a plain tensor of other ranks only: nothing here takes part in a collective
        if isinstance(value, ShardedTensor) or value is None:
            shards = [] if value is None else [
                Shard.from_tensor_and_offsets(s.tensor.to(device), list(s.metadata.shard_offsets), rank)
                for s in value.local_shards()]
            out[key] = init_from_local_shards(shards, *size, process_group=pg)
        else:
            out[key] = value.to(device)
    return out


def _global_size(key: str, value) -> Tuple[int, ...]:
    if isinstance(value, ShardedTensor):
        return tuple(value.size())
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    raise ValueError(f"state_dict_to_device: '{key}' is a {type(value).__name__}, not a tensor or ShardedTensor")


__all__ = ["state_dict_gather", "state_dict_to_device"]
