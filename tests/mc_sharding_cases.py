"""Sharded managed-collision collections under DistributedModelParallel, run on every rank of a
gloo world (see ``test_mc_sharding.py``).

The model: a managed-collision bag (or unpooled) collection of two tables (``u``: two features,
13 rows in 6 buckets, LFU every 2 batches; ``i``: 10 rows in one bucket, LRU every 3 batches)
beside a static bag collection, fused row-wise Adagrad throughout. The reference is the
unsharded model fed the global batch (every rank's bags, rank by rank), with its loss averaged
over the ranks; for a table of several buckets its managed-collision module is
``BucketOracle``: one plain ``MCHManagedCollisionModule`` per bucket, fed the ids that the
documented rule (blocks of ``ceil(input_hash_size / buckets)`` ids) sends it. Nothing is
compared with what the sharded code itself produced.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed import DistributedModelParallel, ShardingEnv, ShardingPlan
from jaggedrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from jaggedrec.modules.hash_mc_modules import HashZchManagedCollisionModule
from jaggedrec.modules.mc_embedding_modules import (ManagedCollisionEmbeddingBagCollection,
                                                    ManagedCollisionEmbeddingCollection)
from jaggedrec.modules.mc_modules import (LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule,
                                          ManagedCollisionCollection)
from jaggedrec.sparse.jagged_tensor import JaggedTensor
from jr_testing import assert_close

H = 1000  # input_hash_size
B = 3
KEYS = ["u1", "u2", "i1", "s1"]
ROWS = {"u": 13, "i": 10, "s": 7}
DIMS = {"u": 4, "i": 3, "s": 5}
BUCKETS = {"u": 6, "i": 1}
HASH_ROWS = 12
POOL = torch.randperm(H, generator=torch.Generator().manual_seed(3))[:40]  # the raw ids seen

# the process group the cases run on (sharding_journey.py runs the 1- and 2-rank cases on the
# first ranks of a 3-rank launch); None: the default group
GROUP = None


def group():
    return GROUP if GROUP is not None else dist.group.WORLD


def _policy(table: str):
    return LFU_EvictionPolicy() if table == "u" else LRU_EvictionPolicy()


def _interval(table: str) -> int:
    return 2 if table == "u" else 3


def _mch(table: str, zch: int, offset: int, buckets: int, unplaced: str) -> MCHManagedCollisionModule:
    return MCHManagedCollisionModule(zch_size=zch, device=torch.device("cpu"), eviction_policy=_policy(table),
                                     eviction_interval=_interval(table), input_hash_size=H, name=table,
                                     output_global_offset=offset, buckets=buckets, unplaced=unplaced)


class BucketOracle(nn.Module):
    """A table of ``k`` buckets as ``k`` independent unsharded modules: bucket ``j`` holds rows
    ``[n*j//k, n*(j+1)//k)`` and the ids ``[j*c, (j+1)*c)``, ``c = ceil(H / k)``."""

    def __init__(self, table: str, n: int, k: int, unplaced: str) -> None:
        super().__init__()
        self.seg = [n * j // k for j in range(k + 1)]
        self.block = -(-H // k)
        self.n = n
        self.parts = nn.ModuleList(_mch(table, self.seg[j + 1] - self.seg[j], self.seg[j], 1, unplaced)
                                   for j in range(k))

    def output_size(self) -> int:
        return self.n

    def forward(self, features: Dict[str, JaggedTensor], mutate_miss_lengths: bool = True):
        (name, jt), = features.items()
        ids = jt.values().long()
        bucket = ids // self.block
        rows = torch.empty_like(ids)
        for j, m in enumerate(self.parts):
            sel = bucket == j
            part = ids[sel]
            rows[sel] = m({name: JaggedTensor(values=part, lengths=torch.tensor([part.numel()]))})[name].values()
        return {name: JaggedTensor(values=rows.to(jt.values().dtype), lengths=jt.lengths())}

    def evict(self):
        for m in self.parts:
            m.evict()
        return None


class Model(nn.Module):
    """``forward(kjt)`` -> (``[B, width]`` pooled rows, or per feature ``[N, dim]`` rows for the
    unpooled kind; the remapped KJT)."""

    def __init__(self, kind: str, oracle: bool = False, unplaced: str = "fallback", hashed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(11)
        config = jr.EmbeddingBagConfig if kind == "ebc" else jr.EmbeddingConfig
        u_rows = HASH_ROWS if hashed else ROWS["u"]
        tables = [config(name="u", embedding_dim=DIMS["u"], num_embeddings=u_rows, feature_names=["u1", "u2"]),
                  config(name="i", embedding_dim=DIMS["i"], num_embeddings=ROWS["i"], feature_names=["i1"])]
        modules = {}
        for t in ("u", "i"):
            if hashed and t == "u":  # buckets of 2 rows, probed 2 deep: ids collide and fall back
                modules[t] = HashZchManagedCollisionModule(zch_size=HASH_ROWS, device=torch.device("cpu"),
                                                           total_num_buckets=BUCKETS["u"], max_probe=2, name="u")
            elif oracle and BUCKETS[t] > 1:
                modules[t] = BucketOracle(t, ROWS[t], BUCKETS[t], unplaced)
            else:
                modules[t] = _mch(t, ROWS[t], 0, BUCKETS[t], unplaced)
        mcc = ManagedCollisionCollection(modules, tables)
        fused = optim.RowWiseAdagrad(0.3, eps=1e-3)
        if kind == "ebc":
            self.mc = ManagedCollisionEmbeddingBagCollection(jr.EmbeddingBagCollection(tables, fused_optimizer=fused),
                                                             mcc, return_remapped_features=True)
        else:
            self.mc = ManagedCollisionEmbeddingCollection(jr.EmbeddingCollection(tables, fused_optimizer=fused), mcc,
                                                          return_remapped_features=True)
        self.kind = kind
        self.static = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="s", embedding_dim=DIMS["s"],
                                                                       num_embeddings=ROWS["s"], feature_names=["s1"])],
                                                fused_optimizer=optim.RowWiseAdagrad(0.3, eps=1e-3))
        # a dense parameter: DistributedModelParallel wraps the model in DDP, which broadcasts
        # buffers every step unless it leaves the sharded modules' (the id maps) alone
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, kjt):
        out, remapped = self.mc(kjt)
        return out, self.static(kjt).values() * self.scale, remapped


def plans(world: int) -> Dict[str, Dict[str, dict]]:
    """Per name, the generators of the managed-collision tables and of the static one."""
    last = world - 1
    return {"tw": {"u": table_wise(rank=last), "i": table_wise(rank=0), "s": table_wise(rank=last)},
            "rw": {"u": row_wise(), "i": row_wise(), "s": row_wise()},
            "mixed": {"u": row_wise(), "i": table_wise(rank=min(1, last)), "s": column_wise(ranks=[0, last])}}


def dmp(model: Model, plan: str, world: int) -> DistributedModelParallel:
    gens = plans(world)[plan]
    mc_plan = construct_module_sharding_plan(model.mc, {t: gens[t] for t in ("u", "i")}, world_size=world)
    static_plan = construct_module_sharding_plan(model.static, {"s": gens["s"]}, world_size=world)
    return DistributedModelParallel(model, ShardingEnv.from_process_group(group()), torch.device("cpu"),
                                    plan=ShardingPlan({"mc": mc_plan, "static": static_plan}))


def batches(seed: int, world: int, empty_rank: int = -1, dtype=torch.int64) -> List[jr.KeyedJaggedTensor]:
    """Per rank a KJT of ``B`` bags per key (keys shuffled, empty bags, duplicate ids); rank
    ``empty_rank`` gets no ids."""
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
    values, lengths = [], []
    for k in KEYS:
        for kjt in per_rank:
            values.append(kjt[k].values())
            lengths.append(kjt[k].lengths())
    return jr.KeyedJaggedTensor(KEYS, torch.cat(values), lengths=torch.cat(lengths))


def _targets(step: int, world: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(500 + step)
    pooled = torch.randn(world * B, DIMS["u"] * 2 + DIMS["i"] + DIMS["s"], generator=gen)
    per_feature = {f: torch.randn(DIMS[f[0]], generator=gen) for f in KEYS}
    return pooled, per_feature


def _loss(model_kind: str, out, static, targets, rows: slice, world: int, scale: float):
    pooled, per_feature = targets
    full = static * pooled[rows, -DIMS["s"]:]
    loss = full.sum()
    if model_kind == "ebc":
        loss = loss + (out.values() * pooled[rows, :-DIMS["s"]]).sum()
    else:
        for f, jt in out.items():
            loss = loss + (jt.values() * per_feature[f]).sum()
    return loss * scale


def _own(kjt: jr.KeyedJaggedTensor, key: str, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s ids of ``key`` in a global KJT."""
    lengths = kjt[key].lengths()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    return kjt[key].values()[int(offsets[rank * B]):int(offsets[(rank + 1) * B])]


def reference_step(ref: Model, step: int, world: int, seed_base: int, empty_rank: int = -1, dtype=torch.int64):
    gk = global_kjt(batches(seed_base + step, world, empty_rank, dtype))
    out, static, remapped = ref(gk)
    _loss(ref.kind, out, static, _targets(step, world), slice(None), world, 1.0 / world).backward()
    return out, static, remapped


def sharded_step(model, rank: int, step: int, world: int, seed_base: int, empty_rank: int = -1, dtype=torch.int64):
    kjt = batches(seed_base + step, world, empty_rank, dtype)[rank]
    out, static, remapped = model(kjt)
    out = out.wait()
    _loss(model.module.kind, out, static, _targets(step, world), slice(rank * B, (rank + 1) * B), world,
          1.0).backward()
    return out, static, remapped


def _reference_modules(ref: Model) -> Dict[Tuple[str, int], MCHManagedCollisionModule]:
    mods = ref.mc.managed_collision_collection.get_submodule("_managed_collision_modules")
    out = {}
    for t in ("u", "i"):
        m = mods[t]
        if isinstance(m, BucketOracle):
            out.update({(t, j): p for j, p in enumerate(m.parts)})
        else:
            out[(t, 0)] = m
    return out


def _live(ref: Model) -> set:
    """(table, bucket, raw id) of every live id of the oracle."""
    out = set()
    for (t, j), m in _reference_modules(ref).items():
        ids = m._mch_sorted_raw_ids
        out.update((t, j, int(i)) for i in ids[ids != torch.iinfo(torch.int64).max])
    return out


def check_state(model, ref: Model, rank: int, what: str) -> None:
    """Every bucket this rank holds has the oracle's id map and metadata, bit for bit; every
    table shard the reference's rows (fp32 tolerance: sums in another order)."""
    expected = _reference_modules(ref)
    mcc = model.module.mc.managed_collision_collection
    for key, m in mcc.local_modules().items():
        whole = expected[(key[0], 0)]
        for name in m.row_state_names():
            got = getattr(m, name)
            if isinstance(whole, HashZchManagedCollisionModule):  # the whole table's rows of the bucket
                want = getattr(whole, name)[2 * key[1]:2 * key[1] + 2]
            else:
                want = getattr(expected[key], name)
            assert torch.equal(got, want), f"{what}: bucket {key} {name}: {got.tolist()} != {want.tolist()}"
    emb = model.module.mc.embedding_module
    inner = ref.mc.get_submodule("_embedding_module")
    local = emb.local_collection()
    for i, s in enumerate(emb._layout.shards[rank]):
        expected_rows = inner.table_weight(s.table)[s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols]
        assert_close(local.table_weight(i).detach(), expected_rows.detach(), torch.float32, f"{what}: {s.local_name}")


def check_outputs(kind: str, got, ref_out, remapped, ref_remapped, rank: int, world: int, what: str) -> None:
    rows = slice(rank * B, (rank + 1) * B)
    for f in ("u1", "u2", "i1"):
        mine, want = remapped[f].values(), _own(ref_remapped, f, rank, world)
        assert torch.equal(mine.long(), want.long()), f"{what}: remapped {f}: {mine.tolist()} != {want.tolist()}"
    if kind == "ebc":
        assert_close(got.values(), ref_out.values()[rows], torch.float32, f"{what}: pooled")
    else:
        for f, jt in got.items():
            n = ref_out[f].lengths()
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(n, 0)])
            want = ref_out[f].values()[int(offsets[rank * B]):int(offsets[(rank + 1) * B])]
            assert_close(jt.values(), want, torch.float32, f"{what}: rows of {f}")


def train_cases(rank: int, world: int) -> List[str]:
    """Every plan, both kinds: 6 training steps (evictions at steps 2, 4, 6 and 3, 6), int32 ids
    in one, an empty rank in another, compared every step."""
    done = []
    for kind in ("ebc", "ec"):
        for plan in plans(world):
            ref = Model(kind, oracle=True)
            model = dmp(Model(kind), plan, world)
            evicted = 0
            for step in range(6):
                before = _live(ref)
                dtype = torch.int32 if step == 1 else torch.int64
                empty = (step % world) if step in (2, 5) else -1
                ref_out, ref_static, ref_remapped = reference_step(ref, step, world, 40, empty, dtype)
                out, static, remapped = sharded_step(model, rank, step, world, 40, empty, dtype)
                what = f"{kind} {plan} step {step}"
                check_outputs(kind, out, ref_out, remapped, ref_remapped, rank, world, what)
                assert_close(static, ref_static[rank * B:(rank + 1) * B], torch.float32, what + " static")
                check_state(model, ref, rank, what)
                evicted += len(before - _live(ref))
            assert evicted > 0, f"{kind} {plan}: no live id was evicted; the case does not test eviction"
            # the free slots of every rank's buckets add up to the oracle's
            slots = model.module.mc.managed_collision_collection.open_slots()
            for t, n in slots.items():
                dist.all_reduce(n, group=group())
                want = sum(int(m.open_slots()) for (tt, _), m in _reference_modules(ref).items() if tt == t)
                assert int(n) == want, f"{kind} {plan}: open slots of {t}: {int(n)} != {want}"
            # eval: ids are remapped read-only, nothing is recorded
            model.eval()
            ref.eval()
            before = _live(ref)
            with torch.no_grad():
                kjts = batches(77, world)
                ref_out, _, ref_remapped = ref(global_kjt(kjts))
                out, _, remapped = model(kjts[rank])
                check_outputs(kind, out.wait(), ref_out, remapped, ref_remapped, rank, world, f"{kind} {plan} eval")
            check_state(model, ref, rank, f"{kind} {plan} eval")
            assert _live(ref) == before
            done.append(f"{kind}-{plan}")
    return done


def hash_cases(rank: int, world: int) -> List[str]:
    """A HashZch table (6 buckets of 2 rows) row-wise and mixed: the sharded buckets probe and
    insert as the whole unsharded module does (its buckets are independent already)."""
    done = []
    for plan in ("rw", "mixed"):
        ref = Model("ebc", hashed=True)
        model = dmp(Model("ebc", hashed=True), plan, world)
        for step in range(4):
            ref_out, _, ref_remapped = reference_step(ref, step, world, 70)
            out, _, remapped = sharded_step(model, rank, step, world, 70)
            what = f"hash {plan} step {step}"
            check_outputs("ebc", out, ref_out, remapped, ref_remapped, rank, world, what)
            check_state(model, ref, rank, what)
        done.append(f"hash-{plan}")
    return done


def _expect_raise(fn, what: str) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{what}: did not raise")


def bad_input_cases(rank: int, world: int) -> List[str]:
    """A bad batch on one rank makes every rank raise (never a hang), and the next step works."""
    messages = []
    model = dmp(Model("ebc"), "mixed", world)
    good = batches(90, world)
    bad_rank = world - 1

    def out_of_range():
        kjt = good[rank]
        if rank == bad_rank:
            values = kjt.values().clone()
            at = kjt.offset_per_key()[kjt.keys().index("u2")]
            values[at:at + 1] = H + 5 if kjt.length_per_key()[kjt.keys().index("u2")] else values[at:at + 1]
            kjt = jr.KeyedJaggedTensor(kjt.keys(), values, lengths=kjt.lengths())
            if kjt.length_per_key()[kjt.keys().index("u2")] == 0:
                kjt = jr.KeyedJaggedTensor(kjt.keys(), torch.cat([kjt.values(), torch.tensor([-1])]),
                                           lengths=torch.cat([kjt.lengths()[:-1], kjt.lengths()[-1:] + 1]))
        model(kjt)[0].wait()

    def missing_feature():
        kjt = good[rank]
        if rank == 0:
            kjt = jr.KeyedJaggedTensor(["u1", "u2", "s1"], kjt.values()[:0], lengths=torch.zeros(3 * B, dtype=torch.int64))
        model(kjt)[0].wait()

    messages.append(_expect_raise(out_of_range, "out of range"))
    messages.append(_expect_raise(missing_feature, "missing feature"))
    model(good[rank])[0].wait()  # the ranks are still in step
    # an owner that cannot place an id (unplaced='raise', nothing live yet): every rank raises
    strict = dmp(Model("ebc", unplaced="raise"), "tw", world)
    messages.append(_expect_raise(lambda: strict(good[rank])[0].wait(), "unplaced"))
    strict.eval()
    dist.barrier(group=group())
    return messages


def _full_like(state) -> dict:
    """Plain tensors of every entry's global size, for dcp.load to fill with the whole checkpoint."""
    out = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out[key] = torch.zeros(value.size(), dtype=_dtype_of(value))
        else:
            out[key] = value.clone()
    return out


def _dtype_of(value: ShardedTensor) -> torch.dtype:
    return value.metadata().tensor_properties.dtype


def check_bit_exact(model, directory: str, what: str) -> int:
    """Each local block of the loaded state equals the checkpoint's block, bit for bit."""
    state = model.state_dict()
    full = _full_like(state)
    dcp.load(full, checkpoint_id=directory, process_group=group())
    compared = 0
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            for s in value.local_shards():
                block = full[key]
                for dim, (start, size) in enumerate(zip(s.metadata.shard_offsets, s.metadata.shard_sizes)):
                    block = block.narrow(dim, start, size)
                assert torch.equal(s.tensor, block), f"{what}: {key} block {s.metadata.shard_offsets}"
                compared += 1
        elif "_current_iter" in key or "fused" in key or key.endswith(".step"):
            assert torch.equal(value, full[key]), f"{what}: {key}"
    return compared


# the checkpoint's journey: (world, plan, steps trained there before saving, seed base)
JOURNEY = [(2, "mixed", 4, 100), (1, "rw", 2, 200), (3, "tw", 2, 300)]


def _reference_after(kind: str, legs: int) -> Model:
    """The oracle model trained through the first ``legs`` legs, saved and reloaded after each
    (a load restarts the eviction schedule, as the sharded module's does)."""
    ref = Model(kind, oracle=True)
    for world, _, steps, base in JOURNEY[:legs]:
        for step in range(steps):
            reference_step(ref, step, world, base)
        fresh = Model(kind, oracle=True)
        fresh.load_state_dict(ref.state_dict())
        _copy_fused_state(ref, fresh)
        ref = fresh
    return ref


def _copy_fused_state(src: Model, dst: Model) -> None:
    for a, b in ((src.mc.get_submodule("_embedding_module"), dst.mc.get_submodule("_embedding_module")),
                 (src.static, dst.static)):
        for (name, t), (_, u) in zip(a.fused_optimizer_state.named_buffers(), b.fused_optimizer_state.named_buffers()):
            u.copy_(t)


def checkpoint_leg(rank: int, world: int, kind: str, leg: int, root: str) -> List[str]:
    """Leg ``leg`` of JOURNEY: load the previous leg's checkpoint into this world's plan (check it
    bit for bit against the checkpoint and the oracle), train, check, save."""
    _, plan, steps, base = JOURNEY[leg]
    model = dmp(Model(kind), plan, world)
    notes = []
    if leg > 0:
        source = os.path.join(root, f"{kind}-{leg - 1}")
        state = model.state_dict()
        dcp.load(state, checkpoint_id=source, process_group=group())
        model.load_state_dict(state)
        blocks = check_bit_exact(model, source, f"{kind} leg {leg}")
        check_state(model, _reference_after(kind, leg), rank, f"{kind} loaded on {world}")
        notes.append(f"{kind} leg {leg}: {blocks} blocks")
    ref = _reference_after(kind, leg)
    for step in range(steps):
        ref_out, _, ref_remapped = reference_step(ref, step, world, base)
        out, _, remapped = sharded_step(model, rank, step, world, base)
        what = f"{kind} leg {leg} step {step}"
        check_outputs(kind, out, ref_out, remapped, ref_remapped, rank, world, what)
        check_state(model, ref, rank, what)
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(root, f"{kind}-{leg}"), process_group=group())
    return notes


def checkpoint_cases(rank: int, world: int, leg: int, root: str) -> List[str]:
    return [n for kind in ("ebc", "ec") for n in checkpoint_leg(rank, world, kind, leg, root)]


def run(rank: int, world: int, calls) -> list:
    return [globals()[name](rank, world, *args) for name, *args in calls]


class _PipeModel(nn.Module):
    """TorchRec's train-pipeline model shape: ``forward(batch)`` -> (loss, output)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Model("ebc")

    def forward(self, batch):
        out, static, _ = self.inner(batch.sparse_features)
        logits = out.values().sum(1) + static.sum(1)
        loss = ((logits - batch.labels) ** 2).mean()
        return loss, logits.detach()


def pipeline_cases(rank: int, world: int) -> List[int]:
    """TrainPipelineSparseDist over an MC-EBC model gives the plain loop's logits, id maps and
    tables bit for bit; the remapped KJT is not the batch's, so the dist the pipeline
    sent ahead is not taken (a counted fallback each step)."""
    import warnings

    from jaggedrec.distributed.train_pipeline import TrainPipelineSparseDist
    from train_pipeline_cases import Batch, run_pipeline

    def build():
        model = _PipeModel()
        gens = plans(world)["mixed"]
        plan = ShardingPlan({"inner.mc": construct_module_sharding_plan(model.inner.mc, {t: gens[t] for t in ("u", "i")},
                                                                        world_size=world),
                             "inner.static": construct_module_sharding_plan(model.inner.static, {"s": gens["s"]},
                                                                            world_size=world)})
        dmp_model = DistributedModelParallel(model, ShardingEnv.from_process_group(group()),
                                             torch.device("cpu"), plan=plan)
        return dmp_model, torch.optim.SGD([dmp_model.module.inner.scale], lr=0.1)

    steps = 5
    data = [Batch(torch.zeros(B, 1), batches(600 + s, world)[rank],
                  torch.randn(B, generator=torch.Generator().manual_seed(rank * 10 + s))) for s in range(steps)]
    ref, ref_opt = build()
    expected = []
    for batch in data:
        ref_opt.zero_grad()
        loss, logits = ref(batch)
        loss.backward()
        ref_opt.step()
        expected.append((loss.detach(), logits))  # progress() returns the output
    model, opt = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pipe = TrainPipelineSparseDist(model, opt, torch.device("cpu"))
        got = run_pipeline(pipe, data)
    assert len(got) == steps, got
    for k, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e[1]), f"step {k}: logits {g} != {e[1]}"
    mine = dict(list(model.module.named_parameters()) + list(model.module.named_buffers()))
    theirs = dict(list(ref.module.named_parameters()) + list(ref.module.named_buffers()))
    assert mine.keys() == theirs.keys() and any("_mch_sorted_raw_ids" in k for k in mine), sorted(mine)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    return pipe.fallbacks


def from_trained_cases(rank: int, world: int) -> List[str]:
    """A model trained unsharded, then sharded (table-wise: the trained module itself; row-wise:
    a fresh one loading its full tensors): the one-bucket table ``i`` keeps its id map and
    metadata (the whole map on the rank holding its first row) and remaps a batch as the trained
    unsharded model does; the table shards hold the trained rows."""
    done = []
    for plan in ("tw", "rw"):
        trained = Model("ebc")
        for step in range(4):
            reference_step(trained, step, world, 800)
        if plan == "tw":  # sharding the trained module itself
            model = dmp(copy.deepcopy(trained), plan, world)
        else:  # loading its full tensors: this rank's blocks are copied
            model = dmp(Model("ebc"), plan, world)
            model.load_state_dict({n: t.clone() for n, t in trained.state_dict().items()}, strict=False)
        whole = trained.mc.managed_collision_collection.get_submodule("_managed_collision_modules")["i"]
        mine = model.module.mc.managed_collision_collection.local_modules()
        if ("i", 0) in mine:
            for name in whole.row_state_names():
                assert torch.equal(getattr(mine[("i", 0)], name), getattr(whole, name)), f"{plan}: {name}"
        trained.eval()
        model.eval()
        with torch.no_grad():
            kjts = batches(900, world)
            ref_out, _, ref_remapped = trained(global_kjt(kjts))
            out, _, remapped = model(kjts[rank])
        mine_i, want_i = remapped["i1"].values(), _own(ref_remapped, "i1", rank, world)
        assert torch.equal(mine_i.long(), want_i.long()), f"{plan}: {mine_i.tolist()} != {want_i.tolist()}"
        emb = model.module.mc.embedding_module
        inner = trained.mc.get_submodule("_embedding_module")
        for i, s in enumerate(emb._layout.shards[rank]):
            rows = inner.table_weight(s.table)[s.row_offset:s.row_offset + s.rows, s.col_offset:s.col_offset + s.cols]
            assert torch.equal(emb.local_collection().table_weight(i).detach(), rows.detach()), f"{plan}: {s.local_name}"
        done.append(plan)
    return done
