"""Resharding checkpoints through torch.distributed.checkpoint, run on every rank of a gloo
world (see ``distributed_harness.py``).

``save_cases`` shards a seeded module by each saved plan, trains it two steps on the global
batches of its world (fused row-wise Adagrad or Adam) and saves it with ``dcp.save``.
``load_cases`` builds the module from another seed, shards it by another plan on another
world size, loads the checkpoint with ``dcp.load`` and ``load_state_dict``, and checks against
the unsharded module trained the same two steps: every shard's weights and optimizer state,
the forward on this world's batch, and a third training step (which reads the step count
and the state). Nothing is compared with what the sharded code itself produced.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Tuple

import torch
import torch.distributed.checkpoint as dcp

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.sharding_plan import (column_wise, data_parallel, row_wise, table_row_wise,
                                                 table_wise)
from jr_testing import assert_close, key_rows, random_configs, reference_pooled
from sharding_cases import global_batch, rank_batches, sharded

SAVE_WORLD = 2
BATCH = 3
MODES = {"adam": lambda: optim.Adam(0.05), "rowwise_adagrad": lambda: optim.RowWiseAdagrad(0.2, eps=1e-3),
         "adagrad": lambda: optim.Adagrad(0.2, eps=1e-3),
         "partial_rowwise_adam": lambda: optim.PartialRowWiseAdam(0.05, weight_decay=0.01)}


def _configs():
    gen = torch.Generator().manual_seed(21)
    configs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32)
    # a second storage group, with its own step and state
    return [dataclasses.replace(c, data_type=jr.DataType.FP16) if i == 3 else c for i, c in enumerate(configs)]


def _plan(name: str, world: int, names: List[str], mode: str):
    """Plans by name; row-wise Adagrad's tables stay whole in columns (see the sharder)."""
    last = world - 1
    adagrad = MODES[mode]().needs_whole_rows  # no column-wise blocks
    if name == "table_wise":
        return {n: table_wise(rank=(i + 1) % world) for i, n in enumerate(names)}
    if name == "row_wise":
        return {n: row_wise() for n in names}
    if name == "column_wise":
        dims = [c.embedding_dim for c in _configs()]
        return {n: column_wise(ranks=[(i + j) % world for j in range(min(d, min(2, world) + i % 2))])
                for i, (n, d) in enumerate(zip(names, dims))}
    kinds = [table_wise(rank=last), row_wise(), table_wise(rank=0) if adagrad else column_wise(ranks=[last, 0]),
             table_row_wise(host_index=0), data_parallel()]
    return {n: kinds[i % len(kinds)] for i, n in enumerate(names)}


def _module(seed: int, mode: str) -> jr.EmbeddingBagCollection:
    torch.manual_seed(seed)
    return jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=MODES[mode]())


def _step(step: int, world: int, rows: Dict[str, int]):
    """This step's per-rank batches, their global KJT and the loss weights ``[W*B, width]``."""
    batches = rank_batches(300 + 10 * world + step, world, rows, BATCH, weighted=True, empty_rank=step % world)
    keys = list(rows)
    gb = global_batch(batches, keys)
    kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                               torch.cat([gb.per_key[k][2] for k in keys]),
                               lengths=torch.cat([gb.per_key[k][1] for k in keys]))
    width = sum(c.embedding_dim * len(c.feature_names) for c in _configs())
    targets = torch.randn(world * BATCH, width, generator=torch.Generator().manual_seed(700 + step))
    return batches, gb, kjt, targets


def _train_reference(reference, world: int, steps) -> None:
    """Unsharded steps on the global batch, the loss averaged over the ranks."""
    rows = key_rows(_configs())
    for step in steps:
        _, _, kjt, targets = _step(step, world, rows)
        (reference(kjt).values() * targets).view(world, BATCH, -1).sum((1, 2)).mean().backward()


def _train_sharded(module, rank: int, world: int, steps) -> None:
    rows = key_rows(_configs())
    for step in steps:
        batches, _, _, targets = _step(step, world, rows)
        (module(batches[rank].kjt).values() * targets[rank * BATCH:(rank + 1) * BATCH]).sum().backward()


def _saved() -> List[Tuple[str, str]]:
    return [("adam", p) for p in ("table_wise", "column_wise", "row_wise", "mixed")] + \
           [("rowwise_adagrad", p) for p in ("table_wise", "row_wise", "mixed")] + \
           [("adagrad", "column_wise"), ("partial_rowwise_adam", "mixed")]


def save_cases(rank: int, world: int, directory: str) -> List[str]:
    names = [c.name for c in _configs()]
    saved = []
    for mode, plan in _saved():
        module = sharded(_module(5, mode), _plan(plan, world, names, mode), world, 1)
        _train_sharded(module, rank, world, range(2))
        dcp.save(module.state_dict(), checkpoint_id=os.path.join(directory, f"{mode}-{plan}"))
        saved.append(f"{mode}-{plan}")
    return saved


def save_and_load_cases(rank: int, world: int, directory: str, targets: Dict[str, str]):
    """``save_cases``, then ``load_cases`` on the same world (one launch)."""
    return save_cases(rank, world, directory), load_cases(rank, world, directory, targets)


def _row_base(layout, table: int) -> int:
    """Where table ``table``'s rows start in its group's row-wise state: the group's tables
    numbered row after row in storage order."""
    slot = layout.tables[table]
    return sum(t.rows for t in layout.tables if t.group == slot.group and t.offset < slot.offset)


def _expected_state(reference, mode: str) -> Dict[str, torch.Tensor]:
    """Per table, the unsharded module's optimizer state as ``[rows]`` or ``[rows, dim]``."""
    state = reference.fused_optimizer_state
    out = {}
    layout = reference._layout
    for t, slot in enumerate(layout.tables):
        group = layout.groups[slot.group].name
        for name, per in MODES[mode]().state:
            flat = getattr(state, f"{group}_{name}")
            if per == "row":
                base = _row_base(layout, t)
                out[f"{slot.name}.{name}"] = flat[base:base + slot.rows]
            else:
                out[f"{slot.name}.{name}"] = flat[slot.offset:slot.offset + slot.rows * slot.dim].view(slot.rows,
                                                                                                       slot.dim)
    return out


def _check_shards(module, reference, mode: str, rank: int, what: str) -> None:
    local = module.local_collection()
    if local is None:
        return
    expected_state = _expected_state(reference, mode)
    layout = local._layout
    for i, s in enumerate(module._layout.shards[rank]):
        name = module._layout.configs[s.table].name
        rows, cols = slice(s.row_offset, s.row_offset + s.rows), slice(s.col_offset, s.col_offset + s.cols)
        dtype = local.table_weight(i).dtype
        assert_close(local.table_weight(i).detach().float(), reference.table_weight(s.table)[rows, cols].detach().float(),
                     dtype, f"{what}: weight of shard {s.local_name}")
        slot = layout.tables[i]
        group = layout.groups[slot.group].name
        for state_name, per in MODES[mode]().state:
            flat = getattr(local.fused_optimizer_state, f"{group}_{state_name}")
            expected = expected_state[f"{name}.{state_name}"]
            if per == "row":
                base = _row_base(layout, i)
                assert_close(flat[base:base + s.rows], expected[rows], torch.float32, f"{what}: {state_name} {s.local_name}")
            else:
                got = flat[slot.offset:slot.offset + s.rows * s.cols].view(s.rows, s.cols)
                assert_close(got, expected[rows, cols], torch.float32, f"{what}: {state_name} {s.local_name}")
        step = getattr(local.fused_optimizer_state, f"{group}_step")
        ref_step = getattr(reference.fused_optimizer_state, f"{reference._layout.groups[reference._layout.tables[s.table].group].name}_step")
        assert int(step) == int(ref_step), (what, int(step), int(ref_step))


def load_cases(rank: int, world: int, directory: str, targets: Dict[str, str]) -> List[str]:
    """``targets``: saved case -> the plan to load it into on this world."""
    names = [c.name for c in _configs()]
    rows = key_rows(_configs())
    checked = []
    for case, plan in targets.items():
        mode = case.split("-")[0]
        reference = _module(5, mode)
        _train_reference(reference, SAVE_WORLD, range(2))
        module = sharded(_module(99, mode), _plan(plan, world, names, mode), world, 1)
        state = module.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(directory, case))
        module.load_state_dict(state)
        what = f"{case} -> {plan} on {world}"
        _check_shards(module, reference, mode, rank, what)
        batches, gb, _, _ = _step(5, world, rows)
        ref = reference_pooled(reference, gb)
        assert_close(module(batches[rank].kjt).values(), ref[rank * BATCH:(rank + 1) * BATCH], torch.float16, what)
        # a third step on this world: the state and step counts carry on
        _train_reference(reference, world, [2])
        _train_sharded(module, rank, world, [2])
        _check_shards(module, reference, mode, rank, what + ", one step later")
        checked.append(what)
    return checked


def unsharded_weights(directory: str, case: str) -> Tuple[jr.EmbeddingBagCollection, jr.EmbeddingBagCollection]:
    """The checkpoint's weights loaded into an unsharded jaggedrec module (no process group),
    and the reference they should equal."""
    mode = case.split("-")[0]
    torch.manual_seed(99)
    module = jr.EmbeddingBagCollection(_configs(), is_weighted=True)
    weights = {k: v for k, v in module.state_dict().items() if k.endswith(".weight")}
    dcp.load(weights, checkpoint_id=os.path.join(directory, case))
    module.load_state_dict(weights)
    reference = _module(5, mode)
    _train_reference(reference, SAVE_WORLD, range(2))
    return module, reference


def probe_batch():
    """A global batch of 2 ranks, as one KJT with weights, and its per-key form."""
    _, gb, kjt, _ = _step(5, SAVE_WORLD, key_rows(_configs()))
    return gb, kjt
