"""The state_dict of a ``mc_modules.ShardedManagedCollisionCollection``: the unsharded module's
keys, the entries indexed by slot as ``ShardedTensor``s of this rank's runs of buckets.

A run's block is its module's own buffer (no copy); the metadata of every rank's runs comes
from the layout (pure Python), so saving needs no collective. ``dcp.load`` reads any plan's
checkpoint into this plan's runs (the saved blocks' row ranges overlap the new ones anywhere:
both are unions of whole buckets, so an id keeps its row). ``load_state_dict`` of a full
tensor (an unsharded module's) or of a ``ShardedTensor`` of the same plan copies the blocks.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from jaggedrec.distributed.sharded_blocks import sharded_tensor

MODULES = "_managed_collision_modules"  # TorchRec's state_dict prefix (the unsharded module's)
_SEGMENTS = "_output_segments_tensor"


def _tables(collection):
    """Per table: (index, name, router, its local ``[(run, module)]``)."""
    layout, runs = collection.bucket_layout, collection.local_runs()
    for t, (name, router) in enumerate(zip(layout.names, collection.routers())):
        yield t, name, router, [(j, m) for tt, j, m in runs if tt == t]


def state_entries(collection, destination, prefix: str):
    """Fill ``destination`` with the collection's entries (see the module's docstring)."""
    for t, name, router, local in _tables(collection):
        base = f"{prefix}{MODULES}.{name}."
        rows = set(router.row_state_names())
        for key, like in router.state_dict().items():
            if key in rows:
                destination[base + key] = _sharded(collection, t, like, [(j, m.state_dict()[key]) for j, m in local])
            elif local:
                destination[base + key] = local[0][1].state_dict()[key]
    return destination


def _sharded(collection, t: int, like: torch.Tensor, blocks) -> ShardedTensor:
    layout = collection.bucket_layout
    seg, rest = layout.segments[t], list(like.shape[1:])
    runs = []
    for j, (_, _, rank) in enumerate(layout.runs[t]):
        first, end = layout.run_rows(t, j)
        runs.append(([first - seg[0]] + [0] * len(rest), [end - first] + rest, rank))
    return sharded_tensor(runs, blocks, [seg[-1] - seg[0]] + rest, like.dtype, collection.rank, collection.device,
                          collection.process_group)


@torch.no_grad()
def load_entries(collection, state_dict, prefix: str, missing_keys: List[str], error_msgs: List[str]) -> None:
    """Pop the collection's keys from ``state_dict`` and copy this rank's runs' blocks (from a
    ``ShardedTensor`` holding them, or a full tensor: an unsharded module's)."""
    layout = collection.bucket_layout
    for t, name, router, local in _tables(collection):
        base = f"{prefix}{MODULES}.{name}."
        rows = set(router.row_state_names())
        seg = layout.segments[t]
        for key in router.state_dict():
            if base + key not in state_dict:
                if local:
                    missing_keys.append(base + key)
                continue
            value = state_dict.pop(base + key)
            if key == _SEGMENTS:  # the buckets are the module's, whatever the saved row blocks were
                continue
            for j, m in local:
                target = m.state_dict(keep_vars=True)[key].data
                first, end = layout.run_rows(t, j)
                if key not in rows:
                    source = value
                elif isinstance(value, ShardedTensor):
                    theirs = {(s.metadata.shard_offsets[0], s.metadata.shard_sizes[0]): s.tensor
                              for s in value.local_shards()}
                    source = theirs.get((first - seg[0], end - first))
                    if source is None:
                        error_msgs.append(f"{base + key}: a ShardedTensor of another plan; load it with "
                                          f"torch.distributed.checkpoint (dcp.load into state_dict()), which "
                                          f"reshards")
                        continue
                else:
                    source = value.narrow(0, first - seg[0], end - first)
                if source.shape != target.shape:
                    error_msgs.append(f"{base + key}: shape {list(source.shape)} for the run's {list(target.shape)}")
                elif source.device.type == "meta":  # a module built on meta: its buckets start empty
                    continue
                elif source.data_ptr() != target.data_ptr():
                    target.copy_(source.to(target.device))


def load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                  error_msgs) -> None:
    """Take the unsharded keys; the run modules then load their own tensors onto themselves
    (and re-validate: ``MCHManagedCollisionModule`` re-sorts its buffers)."""
    load_entries(module, state_dict, prefix, missing_keys, error_msgs)
    for key, value in nn.Module.state_dict(module, prefix=prefix).items():
        state_dict.setdefault(key, value)
