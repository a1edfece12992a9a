"""Bodies of tests/test_hash_sharding.py, run on every rank of a gloo world (``run_ranks``).

The model: a ``HashEmbeddingBagCollection`` with two hashed tables ("u": LRU, two features; "i":
LFU, admitting ids seen twice, its 5 admission counters shared by ids of different buckets) of buckets of 2 slots and one static table ("s"), row-wise Adagrad fused, and a dense
parameter (DistributedModelParallel wraps it in DDP). The oracle is the unsharded model fed the
global batch (each key's bags rank after rank). Fresh rows are drawn from ``[0.05, 0.05]``, so an
evicted row's re-initialisation is the same value on both sides and the tables stay comparable.
"""

from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from jaggedrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.ops.hash_probe_torch import EMPTY
from jr_testing import assert_close
from mc_sharding_cases import check_bit_exact, group

B = 3
KEYS = ["u1", "u2", "i1", "s1"]
ROWS = {"u": 10, "i": 7, "s": 6}  # u: 4 buckets of 2, a left-over row, the fallback row
DIMS = {"u": 4, "i": 3, "s": 5}
POOL = torch.randint(-2 ** 62, 2 ** 62, (24,), generator=torch.Generator().manual_seed(3))


class Model(nn.Module):
    def __init__(self, unplaced: str = "fallback", rows: dict = ROWS) -> None:
        super().__init__()
        tables = [jr.EmbeddingBagConfig(name=t, embedding_dim=DIMS[t], num_embeddings=rows[t],
                                        feature_names=["u1", "u2"] if t == "u" else [f"{t}1"],
                                        weight_init_min=0.05, weight_init_max=0.05) for t in ("u", "i", "s")]
        options = {"u": HashTableOptions(bucket_size=2, eviction="lru", unplaced=unplaced),
                   "i": HashTableOptions(bucket_size=2, eviction="lfu", unplaced="fallback", admit_threshold=2,
                                         sketch_width=5)}  # 5 counters: ids of different buckets share them
        self.hash = HashEmbeddingBagCollection(tables, options, fused_optimizer=optim.RowWiseAdagrad(0.3, eps=1e-3))
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for t in range(3):
                w = self.hash.table_weight(t)
                w.copy_(torch.rand(w.shape, generator=gen) - 0.5)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, kjt):
        """-> (the ``[B, 12]`` pooled rows, the remapped KJT)."""
        if hasattr(self.hash, "embedding_module"):  # sharded
            remapped = self.hash.remap(kjt)
            out = self.hash.embedding_module(remapped).wait()
        else:
            remapped = self.hash.remap(kjt)
            out = jr.EmbeddingBagCollection.forward(self.hash, remapped)
        return out.values() * self.scale, remapped


PLANS = {"tw": lambda last: {"u": table_wise(rank=last), "i": table_wise(rank=0), "s": table_wise(rank=last)},
         "rw": lambda last: {"u": row_wise(), "i": row_wise(), "s": row_wise()},
         "mixed": lambda last: {"u": row_wise(), "i": table_wise(rank=min(1, last)), "s": row_wise()}}


def dmp(model: Model, plan: str, world: int) -> DistributedModelParallel:
    p = construct_module_sharding_plan(model.hash, PLANS[plan](world - 1), world_size=world)
    return DistributedModelParallel(model, ShardingEnv.from_process_group(group()), torch.device("cpu"),
                                    plan=ShardingPlan({"hash": p}))


def batches(seed: int, world: int, empty_rank: int = -1, dtype=torch.int64) -> List[jr.KeyedJaggedTensor]:
    """Per rank a KJT (keys shuffled, empty bags, duplicate ids); rank ``empty_rank`` has no ids."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        keys = [KEYS[i] for i in torch.randperm(len(KEYS), generator=gen).tolist()]
        values, lengths = [], []
        for k in keys:
            lens = torch.randint(0, 4, (B,), generator=gen) * int(r != empty_rank)
            pool = POOL if k != "s1" else torch.arange(ROWS["s"])
            values.append(pool[torch.randint(0, pool.numel(), (int(lens.sum()),), generator=gen)])
            lengths.append(lens)
        out.append(jr.KeyedJaggedTensor(keys, torch.cat(values).to(dtype), lengths=torch.cat(lengths)))
    return out


def global_kjt(per_rank: List[jr.KeyedJaggedTensor]) -> jr.KeyedJaggedTensor:
    values = [kjt[k].values().to(torch.int64) for k in KEYS for kjt in per_rank]
    lengths = [kjt[k].lengths() for k in KEYS for kjt in per_rank]
    return jr.KeyedJaggedTensor(KEYS, torch.cat(values), lengths=torch.cat(lengths))


def _targets(step: int, world: int) -> torch.Tensor:
    return torch.randn(world * B, sum(DIMS[f[0]] for f in KEYS), generator=torch.Generator().manual_seed(500 + step))


def reference_step(ref: Model, step: int, world: int, seed: int, empty_rank: int = -1, dtype=torch.int64):
    out, remapped = ref(global_kjt(batches(seed, world, empty_rank, dtype)))
    ((out * _targets(step, world)).sum() / world).backward()
    return out, remapped


def sharded_step(model, rank: int, step: int, world: int, seed: int, empty_rank: int = -1, dtype=torch.int64):
    out, remapped = model(batches(seed, world, empty_rank, dtype)[rank])
    (out * _targets(step, world)[rank * B:(rank + 1) * B]).sum().backward()
    return out, remapped


def _own(kjt: jr.KeyedJaggedTensor, key: str, rank: int) -> torch.Tensor:
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(kjt[key].lengths(), 0)])
    return kjt[key].values()[int(offsets[rank * B]):int(offsets[(rank + 1) * B])]


def check_step(model, ref: Model, out, ref_out, remapped, ref_remapped, rank: int, what: str) -> None:
    """Remapped rows and every bucket's state bit for bit; outputs and shards to fp32 tolerance."""
    for k in KEYS:
        assert torch.equal(remapped[k].values().to(torch.int64), _own(ref_remapped, k, rank)), f"{what}: rows of {k}"
    assert_close(out.detach(), ref_out[rank * B:(rank + 1) * B].detach(), torch.float32, f"{what}: output")
    check_state(model, ref, rank, what)


def check_state(model, ref: Model, rank: int, what: str) -> int:
    sharded = model.module.hash
    state = ref.hash.hash_state
    names = [t.name for t in state.tables]
    held = 0
    local = sharded.managed_collision_collection.local_modules()
    # one module per table a rank holds, whatever its bucket count (every plan here gives a
    # rank one run of consecutive buckets per table)
    assert len({table for table, _ in local}) == len(local), f"{what}: {sorted(local)}"
    for (table, k), m in local.items():
        first, span = m.bucket_range()
        assert first == k, f"{what}: {table} run at {k} holds buckets from {first}"
        base = state.slot_base(names.index(table)) + 2 * k
        for name in ("keys", "last_step", "count"):
            want = getattr(state, name)[base:base + 2 * span]
            assert torch.equal(getattr(m, name), want), f"{what}: {table} buckets {k}+{span} {name}"
        assert torch.equal(m.step, state.step), f"{what}: step"
        if table == "i":
            base = int(state.column("sketch_base")[names.index(table)])
            assert torch.equal(m.sketch, state.sketch[base:base + 5]), f"{what}: {table} buckets {k}+ sketch"
        held += span
    emb = sharded.embedding_module
    local = emb.local_collection()
    for i, s in enumerate(emb._layout.shards[rank]):
        want = ref.hash.table_weight(s.table)[s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols]
        assert_close(local.table_weight(i).detach(), want.detach(), torch.float32, f"{what}: {s.local_name}")
    return held


def check_counts(model, ref: Model, own_fallback: dict, what: str) -> None:
    """The sharded per-feature counts summed over the ranks (one all-reduce every rank makes)
    equal the oracle's; this rank's fallback count equals its bags' fallback rows in the oracle."""
    sharded = model.module.hash
    for kind, want in (("unplaced", ref.hash.unplaced_counts()), ("fallback", ref.hash.fallback_counts())):
        got = getattr(sharded, f"{kind}_counts")(all_ranks=True)
        got, want = ({f: int(v) for f, v in c.items()} for c in (got, want))
        assert got == want, f"{what}: {kind} counts {got} != {want}"
    mine = {f: int(v) for f, v in sharded.fallback_counts().items()}
    assert mine == own_fallback, f"{what}: this rank's fallback counts {mine} != {own_fallback}"


def add_own_fallback(counts: dict, ref_remapped, rank: int) -> None:
    for k in ("u1", "u2", "i1"):
        counts[k] = counts.get(k, 0) + int((_own(ref_remapped, k, rank) == ROWS[k[0]] - 1).sum())


def _live(ref: Model) -> set:
    keys = ref.hash.hash_state.keys
    return set(keys[keys != EMPTY].tolist())


def train_cases(rank: int, world: int) -> List[str]:
    """Each plan: 5 steps (one with an empty rank, one with int32 ids) against the oracle;
    evictions happen (asserted on the oracle)."""
    done = []
    for plan in ("tw", "rw", "mixed"):
        ref, model = Model(), dmp(Model(), plan, world)
        evicted, own_fallback = 0, {}
        for step in range(5):
            empty = world - 1 if step == 2 else -1
            dtype = torch.int32 if step == 3 else torch.int64
            before = _live(ref)
            ref_out, ref_remapped = reference_step(ref, step, world, 40 + step, empty, dtype)
            evicted += len(before - _live(ref))
            out, remapped = sharded_step(model, rank, step, world, 40 + step, empty, dtype)
            check_step(model, ref, out, ref_out, remapped, ref_remapped, rank, f"{plan} step {step}")
            add_own_fallback(own_fallback, ref_remapped, rank)
            check_counts(model, ref, own_fallback, f"{plan} step {step}")
        assert evicted > 0, f"{plan}: no eviction in 5 steps"
        assert sum(int(v) for v in ref.hash.unplaced_counts().values()) > 0, f"{plan}: no id went unplaced"
        done.append(plan)
    return done


def _expect_raise(fn, what: str) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e)
    raise AssertionError(f"{what}: no error")


def bad_input_cases(rank: int, world: int) -> List[str]:
    """A batch missing a hashed feature on rank 0, one with float ids on the last rank and ids
    that find no slot in a table with unplaced='raise' raise on every rank; then a good step
    still matches the oracle."""
    ref, model = Model(), dmp(Model(), "mixed", world)
    good = batches(7, world)

    def missing():
        kjt = good[rank]
        if rank == 0:
            keep = [k for k in kjt.keys() if k != "i1"]
            kjt = jr.KeyedJaggedTensor(keep, torch.cat([kjt[k].values() for k in keep]),
                                       lengths=torch.cat([kjt[k].lengths() for k in keep]))
        model(kjt)

    def float_ids():
        kjt = good[rank]
        if rank == world - 1:
            kjt = jr.KeyedJaggedTensor(kjt.keys(), kjt.values().to(torch.float32), lengths=kjt.lengths())
        model(kjt)

    def unplaced():  # rank 0 brings every pooled id at once: more new ids than a bucket's 2 slots
        strict = dmp(Model(unplaced="raise"), "mixed", world)
        ids = POOL if rank == 0 else POOL[:0]
        kjt = jr.KeyedJaggedTensor(KEYS, torch.cat([ids, ids[:0], ids[:0], ids[:0]]),
                                   lengths=torch.tensor([ids.numel()] + [0] * (4 * B - 1)))
        strict(kjt)

    messages = [_expect_raise(missing, "missing"), _expect_raise(float_ids, "float ids"),
                _expect_raise(unplaced, "unplaced")]
    ref_out, ref_remapped = reference_step(ref, 0, world, 7)
    out, remapped = sharded_step(model, rank, 0, world, 7)
    check_step(model, ref, out, ref_out, remapped, ref_remapped, rank, "after bad batches")
    return messages


def check_id_map(model, ref: Model, rank: int, world: int, what: str) -> int:
    """A Python dict of the oracle's live ids (id -> row, from its slots) against the sharded
    module in eval: every live id, sent by one rank or another (ids split over the ranks), reads
    its row; an id never seen reads the fallback row. Returns the ids checked."""
    state = ref.hash.hash_state
    rows = {}
    for h, t in enumerate(state.tables):
        for row, key in enumerate(state.live_ids(h).tolist()):
            if key != EMPTY:
                rows.update({(f, key): row for f in t.features})
    fresh = -(2 ** 62) - 7  # outside POOL's range
    per_key = {k: [i for (f, i) in sorted(rows) if f == k][rank::world] + [fresh] for k in KEYS if k != "s1"}
    per_key["s1"] = []
    kjt = jr.KeyedJaggedTensor(KEYS, torch.tensor([i for k in KEYS for i in per_key[k]], dtype=torch.int64),
                               lengths=torch.tensor([n for k in KEYS for n in [len(per_key[k])] + [0] * (B - 1)]))
    sharded = model.module.hash
    sharded.eval()
    remapped = sharded.remap(kjt)
    sharded.train()
    for k in KEYS[:3]:
        want = [rows.get((k, i), ROWS[k[0]] - 1) for i in per_key[k]]
        assert remapped[k].values().tolist() == want, f"{what}: rows of {k}"
    return sum(len(v) - 1 for v in per_key.values() if v)


def many_buckets_cases(rank: int, world: int) -> List[str]:
    """A table of 2048 buckets (and one of 7), row-wise and table-wise: each rank holds one
    module per table (its run of buckets), and 3 training steps give the oracle's rows and
    bucket states, bit for bit."""
    done = []
    for plan in ("rw", "tw"):
        big = dict(ROWS, u=2 * 2048 + 1)
        ref, model = Model(rows=big), Model(rows=big)
        model = DistributedModelParallel(model, ShardingEnv.from_process_group(group()), torch.device("cpu"),
                                         plan=ShardingPlan({"hash": construct_module_sharding_plan(
                                             model.hash, PLANS[plan](world - 1), world_size=world)}))
        local = model.module.hash.managed_collision_collection.local_modules()
        assert len(local) <= 2, f"{plan}: {len(local)} modules on rank {rank}"
        for step in range(3):
            ref_out, ref_remapped = reference_step(ref, step, world, 60 + step)
            out, remapped = sharded_step(model, rank, step, world, 60 + step)
            check_step(model, ref, out, ref_out, remapped, ref_remapped, rank, f"2048 buckets {plan} step {step}")
        done.append(plan)
    return done


# the checkpoint's journey: (world, plan, steps trained there before saving, seed base)
JOURNEY = [(2, "mixed", 3, 100), (1, "rw", 2, 200), (3, "tw", 2, 300)]


def checkpoint_leg(rank: int, world: int, leg: int, root: str) -> List[str]:
    """Leg ``leg`` of JOURNEY: load the previous leg's checkpoint (bit for bit against it, and
    against the oracle trained through the earlier legs), train against the oracle, save."""
    _, plan, steps, base = JOURNEY[leg]
    model = dmp(Model(), plan, world)
    ref = Model()
    for w, _, n, b in JOURNEY[:leg]:
        for step in range(n):
            reference_step(ref, step, w, b + step)
    notes = []
    if leg > 0:
        source = os.path.join(root, f"leg-{leg - 1}")
        state = model.state_dict()
        dcp.load(state, checkpoint_id=source, process_group=group())
        model.load_state_dict(state)
        blocks = check_bit_exact(model, source, f"leg {leg}")
        buckets = check_state(model, ref, rank, f"loaded on {world}")
        ids = check_id_map(model, ref, rank, world, f"loaded on {world}")
        notes.append(f"leg {leg}: {blocks} blocks, {buckets} buckets, {ids} ids")
    for step in range(steps):
        ref_out, ref_remapped = reference_step(ref, step, world, base + step)
        out, remapped = sharded_step(model, rank, step, world, base + step)
        check_step(model, ref, out, ref_out, remapped, ref_remapped, rank, f"leg {leg} step {step}")
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(root, f"leg-{leg}"), process_group=group())
    return notes


def run(rank: int, world: int, calls) -> list:
    return [globals()[name](rank, world, *args) for name, *args in calls]
