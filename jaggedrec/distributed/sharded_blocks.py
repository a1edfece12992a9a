"""A state_dict entry split into row (or row and column) blocks over ranks, as a ``ShardedTensor``.

Every sharded module's checkpoint (the embedding shards in ``checkpoint.py``, the hash buckets in
``mc_state.py``) describes its entries this way: one block per shard, each placed on its rank. The
placement is built here once, because ``ShardedTensor`` checks this rank's blocks against it
(``cuda:1``, not ``cuda``, under NCCL) while the other ranks' placements only name where they live.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch.distributed._shard.metadata import ShardMetadata as TorchShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as TorchShard
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

Block = Tuple[List[int], List[int], int]  # (offsets, sizes, rank) in the whole tensor


def shard_placement(rank: int, mine: int, device: torch.device) -> str:
    """The placement string of a block on ``rank``, seen from rank ``mine`` holding its blocks on
    ``device``: this rank's is that device exactly; another rank's GPU follows the usual one process
    per GPU of a node."""
    if rank == mine or device.type == "cpu":
        where = str(device) if rank == mine else device.type
    else:
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        where = f"{device.type}:{rank % count}" if count else device.type
    return f"rank:{rank}/{where}"


def sharded_tensor(blocks: Sequence[Block], local: Sequence[Tuple[int, torch.Tensor]], size: Sequence[int],
                   dtype: torch.dtype, mine: int, device: torch.device, group) -> ShardedTensor:
    """A ``ShardedTensor`` of ``size`` made of ``blocks``; ``local`` gives this rank's tensors as
    ``(index into blocks, tensor)``. No collective: every rank passes the same ``blocks``."""
    metadata = [TorchShardMetadata(list(offsets), list(sizes), shard_placement(rank, mine, device))
                for offsets, sizes, rank in blocks]
    shards = [TorchShard(tensor, metadata[i]) for i, tensor in local]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(metadata, torch.Size(size), TensorProperties(dtype=dtype)),
        process_group=group)
