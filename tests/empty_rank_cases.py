"""Ranks that hold no shard, or an empty row block, still take part in every collective of a
step (bodies for ``test_sharding_empty_ranks.py``, run on every rank of a gloo world).

Each case trains a model through ``DistributedModelParallel`` for two steps, each rank on its
own slice of a global batch, and checks the losses, the dense weights and every shard against
the unsharded model stepped on the global batch with the loss averaged over the ranks.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.model_parallel import DistributedModelParallel
from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_row_wise, table_wise
from jaggedrec.distributed.types import ShardingPlan
from jr_testing import assert_close, random_kjt
from sharding_cases import global_batch

BATCH = 4
STEPS = 2


class _Model(torch.nn.Module):
    """A collection, then (if ``dense``) a linear head per dim; the loss is a sum over the
    samples, so the global batch's loss averaged over ranks is the reference's."""

    def __init__(self, collection: torch.nn.Module, dense: bool) -> None:
        super().__init__()
        self.sparse = collection
        dims = {c.embedding_dim for c in _configs_of(collection)}
        self.head = torch.nn.ModuleDict({str(d): torch.nn.Linear(d, 1) for d in sorted(dims)}) if dense else None

    def forward(self, kjt: jr.KeyedJaggedTensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.sparse(kjt)
        out = out.wait() if hasattr(out, "wait") else out
        rows = {n: jt.values() for n, jt in out.items()} if isinstance(out, dict) else out.to_dict()
        loss = 0.0
        for name, values in rows.items():
            if self.head is not None:
                values = self.head[str(values.shape[1])](values)
            loss = loss + (values.float() * targets[name][:values.shape[0], :values.shape[1]]).sum()
        return loss


def _configs_of(collection):
    return (collection.embedding_bag_configs() if hasattr(collection, "embedding_bag_configs")
            else collection.embedding_configs())


def _configs(kind: str, rows: List[int], dims: List[int]):
    config = jr.EmbeddingBagConfig if kind == "ebc" else jr.EmbeddingConfig
    return [config(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"])
            for i, (n, d) in enumerate(zip(rows, dims))]


def _plans(world: int) -> Dict[str, tuple]:
    """Per case: (rows per table, dims, per-table plan or None for the planner's, local size)."""
    return {
        # one table, the default planner: on 3 ranks it goes column-wise on two of them
        "planner_one_table": ([100_000], [8], None, world),
        # every table on rank 0
        "table_wise_on_rank_0": ([11, 7], [5, 3], {"t0": table_wise(rank=0), "t1": table_wise(rank=0)}, world),
        # fewer rows than ranks: the last row block is empty
        "row_wise_short_table": ([world - 1, 13], [4, 3], {"t0": row_wise(), "t1": table_wise(rank=world - 1)},
                                 world),
        # table-row-wise within one host of all ranks, one row fewer than ranks
        "table_row_wise_short_table": ([world - 1], [6], {"t0": table_row_wise(host_index=0)}, world),
    }


def _batches(seed: int, world: int, rows: Dict[str, int]):
    gen = torch.Generator().manual_seed(seed)
    return [random_kjt(gen, list(rows), rows, BATCH, max_len=3, id_dtype=torch.int32 if r % 2 else torch.int64)
            for r in range(world)]


def _targets(step: int, world: int, names: List[str], width: int, per_id_rows: Dict[str, int]):
    """Per output name, fixed random weights for each of the global batch's rows."""
    g = torch.Generator().manual_seed(500 + step)
    return {n: torch.randn(per_id_rows[n], width, generator=g) for n in names}


def _case(rank: int, world: int, kind: str, dense: bool, name: str) -> None:
    rows, dims, per_table, local = _plans(world)[name]
    configs = _configs(kind, rows, dims)
    collection = jr.EmbeddingBagCollection if kind == "ebc" else jr.EmbeddingCollection
    torch.manual_seed(21)
    # without dense layers, the tables step in the backward (fused SGD), as such models train
    reference = _Model(collection(configs, fused_optimizer=None if dense else optim.SGD(0.3)), dense)
    model = copy.deepcopy(reference)
    plan = None if per_table is None else ShardingPlan({"sparse": construct_module_sharding_plan(
        model.sparse, per_table, world_size=world, local_size=local)})
    dmp = DistributedModelParallel(model, plan=plan)
    sharded = dmp.module.sparse
    held = sharded.local_collection()
    if per_table is not None:  # a hand plan leaves some rank without a shard, or with an empty block
        shards = [m for p in sharded.plan.values() for m in p.sharding_spec.shards]
        held_by = {int(m.placement.split(":")[1].split("/")[0]) for m in shards if m.shard_sizes[0]}
        assert held_by != set(range(world)) or any(m.shard_sizes[0] == 0 for m in shards), (name, sharded.plan)
    before = reference.sparse.table_weight(0).detach().clone()
    params = list(dmp.parameters())  # none on a rank without shards or dense layers
    opt = torch.optim.SGD(params, lr=0.3) if params else None
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    key_rows = {f"f{i}": n for i, n in enumerate(rows)}
    for step in range(STEPS):
        batches = _batches(10 * step + world, world, key_rows)
        gb = global_batch(batches, list(key_rows))
        keys = list(key_rows)
        kjt = jr.KeyedJaggedTensor(keys, torch.cat([gb.per_key[k][0] for k in keys]),
                                   lengths=torch.cat([gb.per_key[k][1] for k in keys]))
        names = [f"f{i}" for i in range(len(rows))]
        if kind == "ebc":
            counts = {n: world * BATCH for n in names}
            mine_at = {n: (rank * BATCH, BATCH) for n in names}
        else:
            counts = {n: int(gb.per_key[n][1].sum()) for n in names}
            mine_at = {n: (int(gb.per_key[n][1][:rank * BATCH].sum()),
                           int(gb.per_key[n][1][rank * BATCH:(rank + 1) * BATCH].sum())) for n in names}
        targets = _targets(step, world, names, max(dims), counts)
        ref_loss = reference(kjt, targets) / world
        ref_loss.backward()
        own = {n: t.narrow(0, *mine_at[n]) for n, t in targets.items()}
        loss = dmp(batches[rank].kjt, own)
        loss.backward()
        # the loss is a sum over samples: the ranks' losses add up to the global one
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        assert_close(total / world, ref_loss.detach(), torch.float32, f"{kind}/{name}/dense={dense} loss {step}")
        for o in (opt, ref_opt):
            if o is not None:
                o.step()
                o.zero_grad()
    what = f"{kind}/{name}/dense={dense}"
    if dense:
        for (n, p), (_, q) in zip(dmp.module.head.named_parameters(), reference.head.named_parameters()):
            assert_close(p.detach(), q.detach(), torch.float32, f"{what}: head {n}")
    for i, s in enumerate(sharded._layout.shards[rank]):  # noqa: SLF001
        expected = reference.sparse.table_weight(s.table)[s.row_offset:s.row_offset + s.rows,
                                                          s.col_offset:s.col_offset + s.cols]
        assert_close(held.table_weight(i).detach(), expected.detach(), torch.float32, f"{what}: {s.local_name}")
    # the steps moved the table: the comparison above is not between two untouched copies
    assert not torch.equal(reference.sparse.table_weight(0).detach(), before), what


def empty_rank_cases(rank: int, world: int) -> List[str]:
    done = []
    for kind in ("ebc", "ec"):
        for dense in (True, False):
            for name in _plans(world):
                _case(rank, world, kind, dense, name)
                done.append(f"{kind}/{name}/{'dense' if dense else 'no-dense'}")
    return done
