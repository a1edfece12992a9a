"""Column-wise shards of optimizers that step rows by whole-row sums, run on every rank of a
gloo world (see ``distributed_harness.py``; the tests are in ``test_sharding_exact_columns.py``).

Every rank builds the same seeded module and the same per-rank batches, so each can step
the unsharded module itself on the global batch, with the loss averaged over the ranks, as
one step of the sharded module computes it. Ids come from narrow ranges (duplicates in
every bag, hot rows read by many bags and by two features of one table, and one feature
read by two tables); one rank gets no ids in some steps. The bag collection and the unpooled
one (``ec_*``: the same tables as ``EmbeddingConfig``s, a row per id) share the plans, the
checks and the checkpoint chain.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.distributed as dist

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.checkpoint import state_views
from jaggedrec.distributed.embedding import ShardedEmbeddingCollection
from jaggedrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_row_wise, table_wise
from jr_testing import assert_close, key_rows, random_configs
from sharding_cases import global_batch, rank_batches

BATCH = 4
STEPS = 4
OPTIMIZERS = {
    "rowwise_adagrad": lambda: optim.RowWiseAdagrad(0.2, eps=1e-3, weight_decay=0.05),
    "rowwise_adagrad_decouple": lambda: optim.RowWiseAdagrad(0.2, eps=1e-3, weight_decay=0.05,
                                                             weight_decay_mode="decouple"),
    "partial_rowwise_adam": lambda: optim.PartialRowWiseAdam(0.05, weight_decay=0.01),
    "lars_sgd": lambda: optim.LarsSGD(0.3, eta=0.5, weight_decay=0.01),
    "lamb": lambda: optim.LAMB(0.05, weight_decay=0.01),
    "partial_rowwise_lamb": lambda: optim.PartialRowWiseLAMB(0.05, weight_decay=0.02),
    "clipped_rowwise_adagrad": lambda: optim.RowWiseAdagrad(0.2, eps=1e-3, max_gradient=0.05),
}


# element-wise states that only the summed gradients move (the loss here is linear in the
# output, so the gradients do not depend on the weights): the exact blocks sum them as the
# unsharded step does, and these come out bit for bit equal
BITWISE = {"partial_rowwise_adam": ("momentum1",), "lamb": ("momentum1", "momentum2"),
           "partial_rowwise_lamb": ("momentum1",)}


def configs() -> List[jr.EmbeddingBagConfig]:
    gen = torch.Generator().manual_seed(31)
    out = random_configs(gen, (8, 5, 6, 7, 4), jr.DataType.FP32)
    # an fp16 table: a second storage group in the exact collection
    return [dataclasses.replace(c, data_type=jr.DataType.FP16) if i == 3 else c for i, c in enumerate(out)]


def plans(world: int) -> Dict[str, dict]:
    """Column-wise alone (uneven blocks, two blocks of one table on one rank), and mixed with
    table-wise, row-wise, table-row-wise and data-parallel tables; on 3 ranks one plan leaves
    the last rank without any shard."""
    last = world - 1
    out = {
        "column_wise": [column_wise(ranks=[0, last]), column_wise(ranks=[last, 0, last]),
                        column_wise(ranks=list(range(world))), column_wise(ranks=[last, 0]),
                        column_wise(ranks=[0, 0])],
        "mixed": [column_wise(ranks=[last, 0]), row_wise(), column_wise(ranks=[0, last, 0]),
                  table_row_wise(host_index=0), data_parallel()],
    }
    if world > 2:
        out["idle_rank"] = [column_wise(ranks=[1, 0]), table_wise(rank=0), column_wise(ranks=[0, 1, 1]),
                            table_wise(rank=1), column_wise(ranks=[1, 0])]
    names = [c.name for c in configs()]
    return {name: dict(zip(names, kinds)) for name, kinds in out.items()}


# --- the unpooled collection: the same tables as EmbeddingConfigs, rows per id --------------
EC_OPTIMIZERS = {"column_wise": ("rowwise_adagrad", "partial_rowwise_lamb", "lars_sgd", "clipped_rowwise_adagrad"),
                 "mixed": ("rowwise_adagrad_decouple", "partial_rowwise_adam", "lamb"),
                 "idle_rank": ("rowwise_adagrad", "partial_rowwise_lamb")}


def ec_configs() -> List[jr.EmbeddingConfig]:
    return [jr.EmbeddingConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                               feature_names=list(c.feature_names), data_type=c.data_type) for c in configs()]


def _ec_module(mode: str, seed: int = 5) -> jr.EmbeddingCollection:
    torch.manual_seed(seed)
    return jr.EmbeddingCollection(ec_configs(), fused_optimizer=OPTIMIZERS[mode]())


def ec_train(module, reference, rank: int, world: int, steps, seed: int = 0) -> None:
    """``steps`` training steps of the sharded unpooled ``module`` (this rank's batch) and of
    the unsharded ``reference`` (either may be None) (the global batch, the loss averaged over
    the ranks): the loss weighs each id's row by a random row of its sample and output."""
    cs = ec_configs()
    rows = key_rows(cs)
    keys = list(rows)
    for step in steps:
        batches = rank_batches(seed + 60 + step, world, rows, BATCH, weighted=False, empty_rank=step % (world + 1))
        gen = torch.Generator().manual_seed(seed + 800 + step)
        targets = {f"{c.name}.{f}": torch.randn(world * BATCH, c.embedding_dim, generator=gen)
                   for c in cs for f in c.feature_names}
        if reference is not None:
            gb = global_batch(batches, keys)
            kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                       lengths=torch.cat([gb.per_key[k][1] for k in keys]))
            per_rank = 0.0
            for target, jt in zip(targets.values(), reference(kjt).values()):
                sample = torch.repeat_interleave(torch.arange(world * BATCH), jt.lengths())
                weighed = (jt.values() * target[sample]).sum(1)
                per_rank = per_rank + torch.zeros(world).index_add(0, sample // BATCH, weighed)
            per_rank.mean().backward()
        if module is not None:
            loss = 0.0
            for target, jt in zip(targets.values(), module(batches[rank].kjt).wait().values()):
                sample = torch.repeat_interleave(torch.arange(BATCH), jt.lengths()) + rank * BATCH
                loss = loss + (jt.values() * target[sample]).sum()
            loss.backward()


def _train_and_check(make, train_steps, plan_name, plan, mode, rank, world, group, what) -> None:
    """Shard ``make(mode)`` by ``plan``, train it beside an unsharded ``make(mode)`` for STEPS
    steps with ``train_steps``, and check every block and its copies against the reference."""
    reference = make(mode)
    module = _shard(make(mode), plan, world, group)
    assert module._layout.exact_tables, plan_name
    if plan_name == "idle_rank" and rank == world - 1:
        assert not held_blocks(module, rank)
    train_steps(module, reference, rank, world, range(STEPS))
    check_blocks(module, reference, rank, mode, what)
    check_copies_agree(module, rank, world, mode, what)


def ec_step_cases(rank: int, world: int, plan_names=None, group=None) -> List[str]:
    """The unpooled collection: the optimizers of ``EC_OPTIMIZERS`` on the plans of
    :func:`plans` (or those named), ``STEPS`` steps against the unsharded module's, the
    blocks' row states bit-identical; over ``group`` (default: the world) of ``world`` ranks."""
    checked = []
    for plan_name, plan in plans(world).items():
        if plan_names is not None and plan_name not in plan_names:
            continue
        for mode in EC_OPTIMIZERS[plan_name]:
            _train_and_check(_ec_module, ec_train, plan_name, plan, mode, rank, world, group,
                             f"unpooled {mode} on {plan_name}, world {world}")
            checked.append(f"ec/{plan_name}/{mode}")
    return checked


def _module(mode: str) -> jr.EmbeddingBagCollection:
    torch.manual_seed(5)
    return jr.EmbeddingBagCollection(configs(), is_weighted=True, fused_optimizer=OPTIMIZERS[mode]())


def train(module, reference, rank: int, world: int, steps, seed: int = 0) -> None:
    """``steps`` training steps of the sharded ``module`` (this rank's batch) and of the
    unsharded ``reference`` (either may be None) (the global batch, the loss averaged over the ranks)."""
    cs = configs()
    rows = key_rows(cs)
    keys = list(rows)
    width = sum(c.embedding_dim * len(c.feature_names) for c in cs)
    for step in steps:
        batches = rank_batches(seed + 60 + step, world, rows, BATCH, weighted=True, empty_rank=step % (world + 1))
        targets = torch.randn(world * BATCH, width, generator=torch.Generator().manual_seed(seed + 800 + step))
        if reference is not None:
            gb = global_batch(batches, keys)
            kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                       torch.cat([gb.per_key[k][2] for k in keys]),
                                       lengths=torch.cat([gb.per_key[k][1] for k in keys]))
            (reference(kjt).values() * targets).view(world, BATCH, -1).sum((1, 2)).mean().backward()
        if module is not None:
            out = module(batches[rank].kjt)
            (out.values() * targets[rank * BATCH:(rank + 1) * BATCH]).sum().backward()


def held_blocks(module, rank: int):
    """``(shard, collection, local index)`` of every block this rank holds."""
    layout = module._layout
    out = [(s, module.local_collection(), i) for i, s in enumerate(layout.other_shards(rank))]
    return out + [(s, module.exact_collection(), i) for i, s in enumerate(layout.exact_shards(rank))]


def reference_state(reference, table: int, optimizer) -> Dict[str, torch.Tensor]:
    return state_views(reference, table, optimizer)


def check_blocks(module, reference, rank: int, mode: str, what: str) -> List[int]:
    """Every block's weights, optimizer state and step count against the unsharded module's
    (``BITWISE`` states of exact tables bit for bit); returns the exact tables this rank holds."""
    optimizer = OPTIMIZERS[mode]()
    world = module._layout.world_size
    for s, local, i in held_blocks(module, rank):
        rows, cols = slice(s.row_offset, s.row_offset + s.rows), slice(s.col_offset, s.col_offset + s.cols)
        weight = local.table_weight(i)
        expected = reference.table_weight(s.table)[rows, cols]
        assert_close(weight.float(), expected.float(), weight.dtype, f"{what}: weight of {s.local_name}")
        mine, theirs = state_views(local, i, optimizer), reference_state(reference, s.table, optimizer)
        # the unpooled collection's rows come back in the table's dtype and their gradient is
        # divided by the world size after it was rounded to it, where one module divides first:
        # with fp16 tables on 3 ranks the gradients (not only the exact tables') differ in the
        # last fp16 bit
        rounded = (isinstance(module, ShardedEmbeddingCollection) and weight.dtype != torch.float32
                   and world & (world - 1))
        for name, per in optimizer.state:
            want = theirs[name][rows] if per == "row" else theirs[name][rows, cols]
            assert_close(mine[name], want, weight.dtype if rounded else torch.float32,
                         f"{what}: {name} of {s.local_name}")
            if name in BITWISE.get(mode, ()) and s.table in module._layout.exact_tables and not rounded:
                assert torch.equal(mine[name], want), f"{what}: {name} of {s.local_name} is not bit for bit"
        assert int(mine["step"]) == int(theirs["step"]), (what, int(mine["step"]), int(theirs["step"]))
    return sorted({s.table for s in module._layout.exact_shards(rank)})


def check_copies_agree(module, rank: int, world: int, mode: str, what: str) -> None:
    """The row-wise state of every exact table is the same, bit for bit, on each of its blocks."""
    optimizer = OPTIMIZERS[mode]()
    row_states = [name for name, per in optimizer.state if per == "row"]
    mine = {}
    for s, local, i in held_blocks(module, rank):
        if s.table in module._layout.exact_tables:
            views = state_views(local, i, optimizer)
            mine[s.local_name] = (s.table, [views[n].clone() for n in row_states])
    everyone: List[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine, group=module.process_group)
    by_table: Dict[int, list] = {}
    for held in everyone:
        for name, (table, states) in held.items():
            by_table.setdefault(table, []).append((name, states))
    for table, copies in by_table.items():
        first_name, first = copies[0]
        for name, states in copies[1:]:
            for a, b in zip(first, states):
                assert torch.equal(a, b), f"{what}: table {table}'s row state differs between {first_name} and {name}"


def step_cases(rank: int, world: int, plan_names=None, group=None) -> List[str]:
    """Every optimizer on every plan of :func:`plans` (or those named): ``STEPS`` steps against
    the unsharded module's, the blocks' row states bit-identical; over ``group`` (default: the
    world) of ``world`` ranks."""
    checked = []
    for plan_name, plan in plans(world).items():
        if plan_names is not None and plan_name not in plan_names:
            continue
        for mode in OPTIMIZERS:
            # fewer cases keep the launch short; clipping on column-wise tables only (a row-wise
            # MEAN table's local gradient is divided by the bag length before it is clipped)
            if (plan_name != "mixed" and mode.startswith("lars")) or (plan_name != "column_wise"
                                                                       and mode.startswith("clipped")):
                continue
            _train_and_check(_module, train, plan_name, plan, mode, rank, world, group,
                             f"{mode} on {plan_name}, world {world}")
            checked.append(f"{plan_name}/{mode}")
    return checked


# --- checkpoints: column-wise on 2 ranks -> table-wise on 1 -> column-wise on 2 again ---------
CHECKPOINT_MODES = ("rowwise_adagrad", "partial_rowwise_lamb")  # a row-wise state; element- and row-wise


class _Collection(NamedTuple):
    """What the checkpoint chain needs of one collection type."""

    build: Callable[[str, int], torch.nn.Module]   # (optimizer mode, seed) -> the unsharded module
    train: Callable                                 # as :func:`train`
    table_configs: Callable[[], list]


def _seeded(mode: str, seed: int) -> jr.EmbeddingBagCollection:
    torch.manual_seed(seed)
    return jr.EmbeddingBagCollection(configs(), is_weighted=True, fused_optimizer=OPTIMIZERS[mode]())


COLLECTIONS = {"bag": _Collection(_seeded, train, configs), "ec": _Collection(_ec_module, ec_train, ec_configs)}


def _shard(module, per_table, world: int, group=None):
    """``module`` sharded by ``per_table`` over ``group`` (default: the world) with its own sharder."""
    from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
    from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan
    from jaggedrec.distributed.types import ShardingEnv
    plan = construct_module_sharding_plan(module, per_table, world_size=world, local_size=1 if world == 2 else world)
    sharder = (EmbeddingCollectionSharder() if isinstance(module, jr.EmbeddingCollection)
               else EmbeddingBagCollectionSharder())
    return sharder.shard(module, plan, ShardingEnv.from_process_group(group or dist.group.WORLD),
                         torch.device("cpu"))


def blocks(module, rank: int, mode: str) -> List[tuple]:
    """``(key, offsets, tensor)`` of every weight, state and step count this rank holds."""
    optimizer = OPTIMIZERS[mode]()
    out = []
    for s, local, i in held_blocks(module, rank):
        name = module._layout.configs[s.table].name
        out.append((f"{name}.weight", (s.row_offset, s.col_offset), local.table_weight(i).detach().clone()))
        views = state_views(local, i, optimizer)
        for state, per in optimizer.state:
            offsets = (s.row_offset,) if per == "row" else (s.row_offset, s.col_offset)
            out.append((f"{name}.{state}", offsets, views[state].clone()))
        out.append((f"{name}.step", (0,), views["step"].clone()))
    return out


def assemble(pieces: List[tuple]) -> Dict[str, torch.Tensor]:
    """Whole tensors from blocks (copies of one block, as every column block's row-wise state,
    must agree bit for bit)."""
    sizes: Dict[str, list] = {}
    for key, offsets, t in pieces:
        end = [o + n for o, n in zip(offsets, t.shape)]
        sizes[key] = [max(a, b) for a, b in zip(sizes.get(key, end), end)]
    dtypes = {key: t.dtype for key, _, t in pieces}
    full = {key: torch.zeros(size, dtype=dtypes[key]) for key, size in sizes.items()}
    written = set()
    for key, offsets, t in pieces:
        target = full[key]
        for dim, (o, n) in enumerate(zip(offsets, t.shape)):
            target = target.narrow(dim, o, n)
        if (key, offsets) in written:
            assert torch.equal(target, t), f"{key}: two copies of the block at {offsets} differ"
        written.add((key, offsets))
        target.copy_(t)
    return full


def _check_every_block(module, rank: int, mode: str, saved: Dict[str, torch.Tensor], what: str) -> None:
    """Every block this rank holds equals its part of the saved tensors, bit for bit."""
    for key, offsets, t in blocks(module, rank, mode):
        expected = saved[key]
        for dim, (o, n) in enumerate(zip(offsets, t.shape)):
            expected = expected.narrow(dim, o, n)
        assert torch.equal(t, expected), f"{what}: table-wise -> column-wise: {key} at {offsets}"


def _assert_equal(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for key, t in got.items():
        assert torch.equal(t, want[key]), f"{what}: {key} differs"


def save_column_wise(rank: int, world: int, directory: str, kind: str, group) -> List[str]:
    """Two steps on the mixed plan (column-wise blocks beside other layouts), saved."""
    import os
    import torch.distributed.checkpoint as dcp
    collection = COLLECTIONS[kind]
    for mode in CHECKPOINT_MODES:
        module = _shard(collection.build(mode, 5), plans(world)["mixed"], world, group)
        collection.train(module, None, rank, world, range(2))
        dcp.save(module.state_dict(), checkpoint_id=os.path.join(directory, f"{kind}-{mode}-cw"), process_group=group)
        torch.save(blocks(module, rank, mode), os.path.join(directory, f"{kind}-{mode}-cw-{rank}.pt"))
    return [f"{kind}/{mode}" for mode in CHECKPOINT_MODES]


def to_table_wise(directory: str, saved_world: int, kind: str, group) -> List[str]:
    """On a group of one rank: the column-wise checkpoint loaded table-wise, bit for bit, and
    saved again."""
    import os
    import torch.distributed.checkpoint as dcp
    collection = COLLECTIONS[kind]
    for mode in CHECKPOINT_MODES:
        module = _shard(collection.build(mode, 99), {c.name: table_wise(rank=0) for c in collection.table_configs()},
                        1, group)
        state = module.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(directory, f"{kind}-{mode}-cw"), process_group=group)
        module.load_state_dict(state)
        saved = assemble([b for r in range(saved_world)
                          for b in torch.load(os.path.join(directory, f"{kind}-{mode}-cw-{r}.pt"))])
        _assert_equal(assemble(blocks(module, 0, mode)), saved, f"{kind} {mode}: column-wise -> table-wise")
        dcp.save(module.state_dict(), checkpoint_id=os.path.join(directory, f"{kind}-{mode}-tw"), process_group=group)
    return [f"{kind}/{mode}" for mode in CHECKPOINT_MODES]


def back_to_column_wise(rank: int, world: int, directory: str, kind: str, group) -> List[str]:
    """The table-wise checkpoint loaded into other column-wise blocks, bit for bit; a third step
    then matches the unsharded module's (the state and the step count carry on)."""
    import os
    import torch.distributed.checkpoint as dcp
    collection = COLLECTIONS[kind]
    for mode in CHECKPOINT_MODES:
        module = _shard(collection.build(mode, 77), plans(world)["column_wise"], world, group)
        state = module.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(directory, f"{kind}-{mode}-tw"), process_group=group)
        module.load_state_dict(state)
        saved = assemble([b for r in range(world)
                          for b in torch.load(os.path.join(directory, f"{kind}-{mode}-cw-{r}.pt"))])
        what = f"{kind} {mode}"
        _check_every_block(module, rank, mode, saved, what)
        reference = collection.build(mode, 5)
        collection.train(None, reference, rank, world, range(2))
        collection.train(module, reference, rank, world, [2])
        check_blocks(module, reference, rank, mode, f"{what}: a step after table-wise -> column-wise")
        check_copies_agree(module, rank, world, mode, f"{what}: after the round trip")
    return [f"{kind}/{mode}" for mode in CHECKPOINT_MODES]


def checkpoint_round_trip(rank: int, directory: str, pair, alone) -> List[str]:
    """Both collections, column-wise on the 2 ranks of ``pair`` -> table-wise on ``alone``, a
    group of rank 0 (rank 1 waits) -> other column-wise blocks on the 2 ranks; groups made by
    every rank of the world beforehand."""
    done = []
    for kind in COLLECTIONS:
        done += save_column_wise(rank, 2, directory, kind, pair)
    dist.barrier(group=pair)
    if rank == 0:
        for kind in COLLECTIONS:
            done += to_table_wise(directory, 2, kind, alone)
    dist.barrier(group=pair)
    for kind in COLLECTIONS:
        done += back_to_column_wise(rank, 2, directory, kind, pair)
    return done


def fp_case(rank: int, world: int, steps: int = 3, group=None) -> str:
    """A FeatureProcessedEmbeddingBagCollection under DMP, its tables column-wise under fused
    row-wise Adagrad and its position weights training: the weights' gradient comes back
    through the input dist after the exact step on every rank (a rank with no ids in a step
    too); outputs, position weights and tables against the unsharded model."""
    import copy
    from fp_sharding_cases import _check_tables, _fpebc, _Model, _processor_state
    from jaggedrec.distributed.model_parallel import DistributedModelParallel
    from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan
    from jaggedrec.distributed.types import ShardingEnv, ShardingPlan

    gen = torch.Generator().manual_seed(4)
    cs = random_configs(gen, (4, 3, 5, 2, 6), jr.DataType.FP32, mean_every=100, shared=False)
    rows = key_rows(cs)
    keys = list(rows)
    torch.manual_seed(6)
    width = sum(c.embedding_dim * len(c.feature_names) for c in cs)
    reference = _Model(_fpebc(gen, cs, "collection", optim.RowWiseAdagrad(0.2, eps=1e-3), True), width)
    model = copy.deepcopy(reference)
    last = world - 1
    kinds = [column_wise(ranks=[0, last]), row_wise(), column_wise(ranks=[last, 0, last]), table_wise(rank=last),
             column_wise(ranks=list(range(world)))]
    per_table = {c.name: kind for c, kind in zip(cs, kinds)}
    plan = ShardingPlan({"fp": construct_module_sharding_plan(model.fp, per_table, world_size=world,
                                                              local_size=1 if world == 2 else world)})
    dmp = DistributedModelParallel(model, ShardingEnv.from_process_group(group or dist.group.WORLD), plan=plan)

    def dense(m):
        return [p for n, p in m.named_parameters() if p.requires_grad and "embedding_bags" not in n]

    ref_opt, opt = torch.optim.SGD(dense(reference), lr=0.1), torch.optim.SGD(dense(dmp), lr=0.1)
    for step in range(steps):
        batches = rank_batches(90 + step, world, rows, 4, weighted=False, empty_rank=step % world if step else -1)
        gb = global_batch(batches, keys)
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys]))
        target = torch.randn(world * 4, generator=torch.Generator().manual_seed(step))
        expected = reference(kjt)
        out = dmp(batches[rank].kjt)
        assert_close(out, expected[rank * 4:(rank + 1) * 4].detach(), torch.float32, f"fp output, step {step}")
        ((expected - target) ** 2).view(world, 4).sum(1).mean().backward()
        ((out - target[rank * 4:(rank + 1) * 4]) ** 2).sum().backward()
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    mine, theirs = _processor_state(dmp), _processor_state(reference)
    for k in theirs:
        assert_close(mine[k], theirs[k], torch.float32, f"{k} after {steps} steps")
    _check_tables(dmp, reference, rank)
    return "fp/column_wise/rowwise_adagrad"
