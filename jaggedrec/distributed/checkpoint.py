"""A sharded collection's ``state_dict``, in TorchRec's keys, for ``torch.distributed.checkpoint``.

Per table ``<t>`` of the unsharded collection (``embedding_bags`` for a bag collection,
``embeddings`` for the unpooled one):

* ``embedding_bags.<t>.weight``: ``[rows, dim]``;
* with a fused optimizer, its state: ``embedding_bags.<t>.weight.<name>`` (row-wise Adagrad's
  ``sum_sq`` ``[rows]``; Adam's ``exp_avg`` and ``exp_avg_sq`` ``[rows, dim]``) and
  ``embedding_bags.<t>.weight.step`` (``[1]`` int64), beside one ``fused_optimizer.hparams``.

The row-wise state of a table split into column blocks under a fused optimizer that steps
rows by their sums (``ShardLayout.exact_tables``) is the same on every block, and is shown as a
plain ``[rows]`` tensor by each rank that holds a block (``dcp.save`` writes it once).

A table split over ranks (TABLE_WISE on another rank included) is a ``ShardedTensor`` whose
local shards are views of this rank's storage, and whose global metadata comes from the plan,
so ``state_dict()`` needs no collective. Replicated tables and the step counts are plain
tensors. ``dcp.save`` writes each shard once; ``dcp.load`` into the ``state_dict()`` of a
module sharded by any other plan, on any world size, reads each rank's blocks straight into
its storage: that is the resharding. ``load_state_dict`` takes such entries too, or plain
full tensors (an unsharded module's state), and copies this rank's blocks.

Why ShardedTensor, deprecated as it is: a DTensor describes only even splits, and TABLE_WISE,
uneven COLUMN_WISE blocks and a plan that mixes them are not; DCP reads and writes
ShardedTensor's arbitrary blocks, and TorchRec's own checkpoints use it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from jaggedrec.modules.embedding_configs import EmbeddingBagConfig
from jaggedrec.distributed.shard_layout import REPLICA, Shard, ShardLayout
from jaggedrec.distributed.sharded_blocks import sharded_tensor

HPARAMS = "fused_optimizer.hparams"

# one state tensor of one shard: (its block's offsets in the table's state, its local tensor)
_Block = Tuple[List[int], torch.Tensor]


@dataclass
class _Entry:
    """One key of the state: its table (-1: none), global size and dtype, this rank's blocks."""

    table: int
    size: List[int]
    dtype: torch.dtype
    replicated: bool
    blocks: List[_Block] = field(default_factory=list)


class ShardedState:
    """The tensors of one rank's shards, table by table, that ``state_dict`` shows and
    ``load_state_dict`` fills. ``local``: the rank's local collection of its other shards,
    ``exact``: that of its shards of exact tables (None: it holds none); ``optimizer``: the
    shards' fused optimizer (None: none)."""

    def __init__(self, layout: ShardLayout, rank: int, local, optimizer, group, device: torch.device,
                 exact=None) -> None:
        self._layout, self._rank, self._local, self._group = layout, rank, local, group
        self._optimizer, self._device, self._exact = optimizer, device, exact
        self._prefix = "embedding_bags" if isinstance(layout.configs[0], EmbeddingBagConfig) else "embeddings"

    # --- what there is ------------------------------------------------------------------
    def _entries(self) -> Dict[str, _Entry]:
        layout, optimizer = self._layout, self._optimizer
        entries: Dict[str, _Entry] = {}
        for t, config in enumerate(layout.configs):
            key, replicated = f"{self._prefix}.{config.name}.weight", self._replicated(t)
            entries[key] = _Entry(t, [config.num_embeddings, config.embedding_dim], config.data_type.to_torch(),
                                  replicated)
            for name, per in (optimizer.state if optimizer is not None else ()):
                size = [config.num_embeddings] + ([] if per == "row" else [config.embedding_dim])
                # an exact table's row-wise state: the same on every column block
                same = per == "row" and t in layout.exact_tables
                entries[f"{key}.{name}"] = _Entry(t, size, torch.float32, replicated or same)
        holders = [(self._local, layout.other_shards(self._rank)), (self._exact, layout.exact_shards(self._rank))]
        for collection, shards in holders:
            if collection is not None:
                self._add_blocks(entries, collection, shards)
        return entries

    def _add_blocks(self, entries: Dict[str, _Entry], local, shards: List[Shard]) -> None:
        """The blocks of ``local``'s tables, one per shard of ``shards``."""
        optimizer = self._optimizer
        for i, s in enumerate(shards):
            key = f"{self._prefix}.{self._layout.configs[s.table].name}.weight"
            entries[key].blocks.append(([s.row_offset, s.col_offset], local.table_weight(i).detach()))
            if optimizer is None:
                continue
            views = state_views(local, i, optimizer)
            for name, per in optimizer.state:
                offsets = [s.row_offset] if per == "row" else [s.row_offset, s.col_offset]
                entries[f"{key}.{name}"].blocks.append((offsets, views[name]))
            step = entries.setdefault(f"{key}.step", _Entry(s.table, [1], torch.int64, True))
            step.blocks[:1] = [([0], views["step"])]
        if optimizer is not None:
            state = local.fused_optimizer_state
            entries.setdefault(HPARAMS, _Entry(-1, [state.hparams.numel()], torch.float32, True)).blocks.append(
                ([0], state.hparams))

    def _replicated(self, table: int) -> bool:
        return self._layout.table_kind(table) == REPLICA

    def _shards_of(self, table: int) -> List[Shard]:
        return [s for s in self._layout.table_shards[table] if s.rows > 0 and s.cols > 0]

    # --- state_dict -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {}
        for key, entry in self._entries().items():
            if entry.replicated:
                if entry.blocks:
                    out[key] = entry.blocks[0][1]
                continue
            out[key] = self._sharded_tensor(entry)
        return out

    def _sharded_tensor(self, entry: _Entry) -> ShardedTensor:
        blocks = []
        for s in self._shards_of(entry.table):
            offsets, sizes = ([s.row_offset], [s.rows]) if len(entry.size) == 1 else (
                [s.row_offset, s.col_offset], [s.rows, s.cols])
            blocks.append((offsets, sizes, s.rank))
        mine = {tuple(offsets): i for i, (offsets, _, rank) in enumerate(blocks) if rank == self._rank}
        local = [(mine[tuple(offsets)], tensor) for offsets, tensor in entry.blocks]
        return sharded_tensor(blocks, local, entry.size, entry.dtype, self._rank, self._device, self._group)

    # --- load_state_dict --------------------------------------------------------------------
    @torch.no_grad()
    def load(self, state_dict: Dict[str, object], prefix: str, missing_keys: List[str],
             error_msgs: List[str]) -> None:
        """Pop this module's keys from ``state_dict`` and copy this rank's blocks."""
        for key, entry in self._entries().items():
            full_key = prefix + key
            if full_key not in state_dict:
                if entry.blocks or not entry.replicated:
                    missing_keys.append(full_key)
                continue
            value = state_dict.pop(full_key)
            problem = _copy_blocks(value, entry.size, entry.blocks)
            if problem:
                error_msgs.append(f"{full_key}: {problem}")


def _copy_blocks(value, size: List[int], blocks: List[_Block]) -> Optional[str]:
    if list(value.shape) != size:
        return f"shape {list(value.shape)}, the module's table is {size}"
    if isinstance(value, ShardedTensor):
        theirs = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}
        for offsets, tensor in blocks:
            source = theirs.get(tuple(offsets))
            if source is None or source.shape != tensor.shape:
                return ("a ShardedTensor of another plan; load it with torch.distributed.checkpoint "
                        "(dcp.load into this module's state_dict()), which reshards")
            if source.data_ptr() != tensor.data_ptr():
                tensor.copy_(source)
        return None
    for offsets, tensor in blocks:
        source = value
        for dim, (start, length) in enumerate(zip(offsets, tensor.shape)):
            source = source.narrow(dim, start, length)
        if source.data_ptr() != tensor.data_ptr():
            tensor.copy_(source.to(tensor.device))
    return None


def state_views(local, table: int, optimizer) -> Dict[str, torch.Tensor]:
    """Local table ``table``'s fused optimizer state in ``local``, by name: row-wise ``[rows]``
    and element-wise ``[rows, cols]`` views of the group's flat buffers, and ``"step"`` (the
    group's ``[1]`` step count)."""
    state, tables, groups = local.fused_optimizer_state, local.layout.tables, local.layout.groups
    slot = tables[table]
    group = groups[slot.group].name
    views = {"step": getattr(state, f"{group}_step")}
    for name, per in optimizer.state:
        flat = getattr(state, f"{group}_{name}")
        views[name] = (flat.narrow(0, _row_state_base(local.layout, table), slot.rows) if per == "row" else
                       flat.narrow(0, slot.offset, slot.rows * slot.dim).view(slot.rows, slot.dim))
    return views


def _row_state_base(layout, table: int) -> int:
    """First row of local table ``table`` in its group's row-wise state: the group's tables
    numbered row after row in storage order (as ``FeatureTables.row_bases``)."""
    slot = layout.tables[table]
    return sum(t.rows for t in layout.tables if t.group == slot.group and t.offset < slot.offset)


class ShardedStateDict:
    """For a sharded collection (an ``nn.Module``): ``state_dict`` and ``load_state_dict`` in the
    keys above instead of the submodules' own."""

    def _init_state_dict(self, layout: ShardLayout, rank: int, local, optimizer, group, device, exact=None) -> None:
        self._state = ShardedState(layout, rank, local, optimizer, group, device, exact)
        self.register_load_state_dict_pre_hook(_load_sharded_state)

    @property
    def sharded_state(self) -> ShardedState:
        """This rank's tensors, table by table, as ``state_dict`` shows them."""
        return self._state

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """TorchRec's keys, as ``ShardedTensor``s of this rank's shards, plain for replicated
        tables. Save and load it with ``torch.distributed.checkpoint``, which reshards across
        plans and world sizes."""
        destination = destination if destination is not None else OrderedDict()
        for key, value in self._state.state_dict().items():
            destination[prefix + key] = value
        return destination


def _load_sharded_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """Take the sharded collection's keys; its submodules then load their own tensors onto
    themselves."""
    module.sharded_state.load(state_dict, prefix, missing_keys, error_msgs)
    for key, value in nn.Module.state_dict(module, prefix=prefix).items():
        state_dict.setdefault(key, value)
