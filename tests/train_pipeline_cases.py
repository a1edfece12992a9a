"""Train-pipeline test bodies that run on every rank of a gloo world (``run_cases`` of
``sharding_cases``). The reference is the same model, built from the same seeds and sharded
by the same plan, trained without a pipeline on the same batches in a plain loop: the
pipelines must give the same losses and weights bit for bit. For the semi-sync pipeline the
loop looks batch k up explicitly before batch k-1's forward (its definition).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

import jaggedrec as jr
from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.model_parallel import DistributedModelParallel
from jaggedrec.distributed.sharding_plan import (column_wise, construct_module_sharding_plan, data_parallel,
                                                 row_wise, table_row_wise, table_wise)
from jaggedrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSemiSync, TrainPipelineSparseDist
from jaggedrec.distributed.types import ShardingPlan
from jr_testing import random_kjt, shuffled_keys

DENSE = 4
EC_DIM = 4


@dataclass
class Batch:
    """TorchRec's Batch shape, plus a variable-batch KJT for an unsharded collection."""

    dense_features: torch.Tensor  # [B, DENSE]
    sparse_features: jr.KeyedJaggedTensor
    labels: torch.Tensor  # [B]
    vbe_features: Optional[jr.KeyedJaggedTensor] = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.dense_features.to(device, non_blocking=non_blocking),
                     self.sparse_features.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking),
                     None if self.vbe_features is None else self.vbe_features.to(device, non_blocking=non_blocking))

    def record_stream(self, stream) -> None:  # CUDA only
        for t in (self.dense_features, self.labels):
            t.record_stream(stream)
        self.sparse_features.record_stream(stream)


def _ebc_configs() -> List[jr.EmbeddingBagConfig]:
    dims, rows = (4, 3, 5, 2, 6), (11, 37, 8, 23, 16)
    return [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"],
                                  pooling=jr.PoolingType.MEAN if i == 1 else jr.PoolingType.SUM)
            for i, (d, n) in enumerate(zip(dims, rows))]


def _ec_configs() -> List[jr.EmbeddingConfig]:
    return [jr.EmbeddingConfig(name=f"e{i}", embedding_dim=EC_DIM, num_embeddings=n, feature_names=[f"f{i}"])
            for i, n in ((0, 11), (2, 8), (4, 16))]


def _vbe_configs() -> List[jr.EmbeddingBagConfig]:
    return [jr.EmbeddingBagConfig(name="v0", embedding_dim=3, num_embeddings=9, feature_names=["u"]),
            jr.EmbeddingBagConfig(name="v1", embedding_dim=2, num_embeddings=7, feature_names=["w"])]


ROWS = {f"f{i}": n for i, n in enumerate((11, 37, 8, 23, 16))}
EC_ROWS = {"f0": 11, "f2": 8, "f4": 16}


class Net(nn.Module):
    """A sharded EBC and EC on ``batch.sparse_features``, a dense bottom layer, an unsharded
    EBC on the variable-batch ``batch.vbe_features`` (data parallel, in DDP) and a top layer.

    ``modify``: the EC gets a new KJT (ids remapped) on the ranks listed, so its input cannot
    be sent ahead. ``raise_at``: the forward of that call raises (after the sharded lookups).
    ``looked_up``: outputs of the sharded modules computed beforehand (semi-sync reference).
    """

    def __init__(self, vbe: bool, modify_on=(), raise_at: int = -1, in_place: bool = False) -> None:
        super().__init__()
        self.ebc = jr.EmbeddingBagCollection(_ebc_configs())
        self.ec = jr.EmbeddingCollection(_ec_configs())
        self.vbe = jr.EmbeddingBagCollection(_vbe_configs()) if vbe else None
        self.bottom = nn.Linear(DENSE, 3)
        width = 3 + sum(c.embedding_dim for c in _ebc_configs()) + EC_DIM * 3 + (5 if vbe else 0)
        self.top = nn.Linear(width, 1)
        self.modify_on, self.raise_at, self.calls = tuple(modify_on), raise_at, 0
        self.in_place = in_place  # remap the ids in place after the EBC, before the EC

    def forward(self, batch: Batch, looked_up: Optional[Dict[str, object]] = None):
        kjt = batch.sparse_features
        looked_up = looked_up or {}
        pooled = (looked_up["ebc"] if "ebc" in looked_up else self.ebc(kjt))
        ec_kjt = kjt
        if self.in_place:
            kjt.values().remainder_(7)
        if dist.get_rank() in self.modify_on:
            ec_kjt = jr.KeyedJaggedTensor(kjt.keys(), kjt.values() % 7, None, lengths=kjt.lengths())
        rows = looked_up["ec"] if "ec" in looked_up else self.ec(ec_kjt)
        self.calls += 1
        if self.calls == self.raise_at:
            raise RuntimeError(f"model raises on call {self.calls}")
        b = batch.labels.numel()
        parts = [torch.relu(self.bottom(batch.dense_features)), pooled.values()]
        for name in ("f0", "f2", "f4"):
            jt = rows[name]
            bag = torch.repeat_interleave(torch.arange(b), jt.lengths().long())
            parts.append(torch.zeros(b, EC_DIM).index_add(0, bag, jt.values()))
        if self.vbe is not None:
            parts.append(self.vbe(batch.vbe_features).values())
        logits = self.top(torch.cat(parts, 1)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


def make_batches(rank: int, world: int, steps: int, batch: int = 5, vbe: bool = False, bad=None) -> List[Batch]:
    """This rank's batches: shuffled keys, int32 ids on odd ranks, a feature with no ids,
    empty bags; ``bad=(rank, step)``: an id out of its table there."""
    out = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        keys = shuffled_keys(gen, list(ROWS))
        kjt = random_kjt(gen, keys, ROWS, batch, max_len=3, empty_keys=[keys[step % len(keys)]],
                         id_dtype=torch.int32 if rank % 2 else torch.int64).kjt
        if bad == (rank, step):
            values = kjt.values().clone()
            values[-1] = 40  # every table has fewer rows
            kjt = jr.KeyedJaggedTensor(kjt.keys(), values, None, lengths=kjt.lengths())
        vbe_kjt = None
        if vbe:  # "u" with 2 distinct bags, "w" with 3, each expanded to the batch's B samples
            lengths = torch.randint(0, 3, (5,), generator=gen)
            ids = torch.cat([torch.randint(0, 9, (int(lengths[:2].sum()),), generator=gen),
                             torch.randint(0, 7, (int(lengths[2:].sum()),), generator=gen)])
            inverse = torch.stack([torch.randint(0, 2, (batch,), generator=gen),
                                   torch.randint(0, 3, (batch,), generator=gen)])
            vbe_kjt = jr.KeyedJaggedTensor(["u", "w"], ids, None, lengths=lengths, stride_per_key_per_rank=[[2], [3]],
                                           inverse_indices=(["u", "w"], inverse))
        out.append(Batch(torch.randn(batch, DENSE, generator=gen), kjt,
                         torch.randint(0, 2, (batch,), generator=gen).float(), vbe_kjt))
    return out


def _plans(world: int, kind: str) -> ShardingPlan:
    names = [c.name for c in _ebc_configs()]
    if kind == "mixed":  # TW, RW, CW, TWRW, DP
        ebc = [table_wise(rank=world - 1), row_wise(), column_wise(ranks=[1, 0]), table_row_wise(host_index=0),
               data_parallel()]
        ec = [column_wise(ranks=[0, 1]), table_wise(rank=0), row_wise()]
    else:  # whole rows, for row-wise Adagrad: TW, RW, DP
        ebc = [table_wise(rank=world - 1), row_wise(), data_parallel(), table_wise(rank=0), row_wise()]
        ec = [row_wise(), data_parallel(), table_wise(rank=world - 1)]
    local = 1 if world == 2 else world
    probe = Net(False)
    return ShardingPlan({
        "ebc": construct_module_sharding_plan(probe.ebc, dict(zip(names, ebc)), world_size=world, local_size=local),
        "ec": construct_module_sharding_plan(probe.ec, {c.name: g for c, g in zip(_ec_configs(), ec)},
                                             world_size=world, local_size=local)})


FUSED = {"sgd": {"optimizer": "exact_sgd", "learning_rate": 0.3},
         "adam": {"optimizer": "adam", "learning_rate": 0.05},
         "rowwise_adagrad": {"optimizer": "exact_rowwise_adagrad", "learning_rate": 0.2, "eps": 1e-3}}


def build(world: int, setup: dict):
    """The DMP model and its dense optimizer for ``setup`` (the same every call)."""
    torch.manual_seed(17)
    net = Net(setup.get("vbe", False), setup.get("modify_on", ()), setup.get("raise_at", -1),
              setup.get("in_place", False))
    if setup["ec_opt"] == "in_backward_sgd":  # TorchRec's other way: an optimizer on the weights
        from torch.distributed.optim import _apply_optimizer_in_backward
        _apply_optimizer_in_backward(torch.optim.SGD, net.ec.parameters(), {"lr": 0.2})
    sharders = [EmbeddingBagCollectionSharder(FUSED[setup["ebc_opt"]]),
                EmbeddingCollectionSharder(FUSED.get(setup["ec_opt"]))]
    dmp = DistributedModelParallel(net, plan=_plans(world, setup["plan"]), sharders=sharders)
    assert dmp.module.ebc.fused_optimizer is not None and dmp.module.ec.fused_optimizer is not None
    dense = [p for n, p in dmp.named_parameters() if not n.startswith(("ebc.", "ec."))]
    return dmp, torch.optim.SGD(dense, lr=0.1)


def plain_loop(dmp, opt, batches, semi_sync_from: Optional[int] = None, ahead=("ebc", "ec")) -> List[object]:
    """Train without a pipeline; ``semi_sync_from``: batch k >= it is looked up (the sharded
    modules named in ``ahead``, explicitly) before batch k-1's forward. Failed steps give the
    exception's type."""
    model = dmp.module
    out, looked = [], {}

    def look_up(k):
        if semi_sync_from is not None and k < len(batches) and k >= semi_sync_from:
            kjt = batches[k].sparse_features
            try:  # its backward reads the rows as they are then (see TrainPipelineSemiSync)
                with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                    looked[k] = {name: getattr(model, name)(kjt) for name in ahead}
            except ValueError as e:  # a rejected batch: raised in its own step
                looked[k] = e

    look_up(0)
    for k, batch in enumerate(batches):
        look_up(k + 1)
        opt.zero_grad()
        try:
            early = looked.pop(k, None)
            if isinstance(early, Exception):
                raise early
            loss, output = dmp(batch, looked_up=early) if early is not None else dmp(batch)
        except (RuntimeError, ValueError) as e:
            out.append(type(e).__name__)
            continue
        loss.backward()
        opt.step()
        out.append(output)
    return out


def run_pipeline(pipeline, batches) -> List[object]:
    """``progress`` until StopIteration; failed steps give the exception's type."""
    it, out = iter(batches), []
    for _ in range(len(batches) + 3):
        try:
            output = pipeline.progress(it)
        except StopIteration:
            break
        except (RuntimeError, ValueError) as e:
            out.append(type(e).__name__)
            continue
        out.append(output)
    else:
        raise AssertionError("the pipeline did not stop")
    with_stop = True
    try:
        pipeline.progress(it)
        with_stop = False
    except StopIteration:
        pass
    assert with_stop, "progress after the end must raise StopIteration again"
    return out


def weights(dmp) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in dmp.named_parameters()}


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n} differs (max {float((a[n] - b[n]).abs().max())})"


def assert_same_steps(got: list, expected: list, what: str) -> None:
    """Step by step: the same exception type, or bit-identical (loss, logits)."""
    assert len(got) == len(expected), f"{what}: {len(got)} steps run, expected {len(expected)}"
    for k, (g, e) in enumerate(zip(got, expected)):
        if isinstance(e, str) or isinstance(g, str):
            assert g == e, f"{what}: step {k}: {g} != {e}"
        else:
            assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1]), f"{what}: step {k}: loss {g[0]} != {e[0]}"


def _run(cls, world: int, setup: dict, batches: List[Batch], **kwargs):
    dmp, opt = build(world, setup)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = cls(dmp, opt, torch.device("cpu"), **kwargs)
        got = run_pipeline(pipe, batches)
    return dmp, pipe, got, [str(w.message) for w in caught if "train pipeline" in str(w.message)]


SETUPS = {
    "mixed/sgd+adam/vbe": dict(plan="mixed", ebc_opt="sgd", ec_opt="adam", vbe=True),
    "whole/rowwise_adagrad+in_backward_sgd/modified": dict(plan="whole", ebc_opt="rowwise_adagrad",
                                                           ec_opt="in_backward_sgd", modify_on="all"),
}
STEPS = 20


def equal_training_cases(rank: int, world: int) -> Dict[str, dict]:
    """Base and SparseDist over 20 steps against the plain loop, bit for bit; the fallback
    counter; the most batches held at once."""
    from jaggedrec.distributed.train_pipeline._batches import batch_bytes
    report = {}
    for name, setup in SETUPS.items():
        setup = dict(setup)
        if setup.get("modify_on") == "all":
            setup["modify_on"] = tuple(range(world))
        batches = make_batches(rank, world, STEPS, vbe=setup.get("vbe", False))
        ref, ref_opt = build(world, setup)
        initial = weights(build(world, setup)[0])
        expected = plain_loop(ref, ref_opt, batches)
        assert not any(isinstance(e, str) for e in expected)
        trained = weights(ref)
        for prefix in ("ebc.", "ec.", "top."):  # every part trains: the comparison below means something
            assert any(not torch.equal(trained[n], initial[n]) for n in trained if n.startswith(prefix)), prefix
        pipelines = ((TrainPipelineBase, 2), (TrainPipelineSparseDist, 3)) if setup.get("vbe") else \
            ((TrainPipelineSparseDist, 3),)
        for cls, stages in pipelines:
            dmp, pipe, got, warned = _run(cls, world, setup, batches)
            what = f"{name} {cls.__name__}"
            assert_same_steps(got, expected, what)
            assert_same(weights(dmp), weights(ref), what)
            if cls is TrainPipelineSparseDist:
                modified = bool(setup.get("modify_on"))
                assert pipe.fallbacks == ({"ec": STEPS} if modified else {}), (what, pipe.fallbacks)
                assert len(warned) == (1 if modified else 0) and (not modified or "'ec'" in warned[0]), warned
            stats = pipe.memory_stats()
            biggest = max(batch_bytes(b) for b in batches)
            assert stats["peak_batches"] == stages, (what, stats)
            assert stats["peak_batch_bytes"] <= stages * biggest, (what, stats, biggest)
            report[what] = dict(stats, biggest_batch_bytes=biggest)
            pipe.close()
    return report


def semi_sync_cases(rank: int, world: int) -> List[str]:
    """TrainPipelineSemiSync against its definition (the plain loop with early lookups), bit
    for bit; the staleness is real (the sync loop differs from the first early batch on)."""
    setup = dict(plan="mixed", ebc_opt="sgd", ec_opt="adam")
    batches = make_batches(rank, world, 10)
    sync, sync_opt = build(world, setup)
    plain = plain_loop(sync, sync_opt, batches)
    checked = []
    for start in (0, 4):
        ref, ref_opt = build(world, setup)
        expected = plain_loop(ref, ref_opt, batches, semi_sync_from=start)
        dmp, pipe, got, warned = _run(TrainPipelineSemiSync, world, setup, batches, start_batch=start)
        assert_same_steps(got, expected, f"semi-sync from {start}")
        assert_same(weights(dmp), weights(ref), f"semi-sync from {start}")
        assert pipe.fallbacks == {} and not warned, (pipe.fallbacks, warned)
        first_stale = max(start, 1)  # batch 0 is looked up with the initial weights either way
        assert_same_steps(expected[:first_stale], plain[:first_stale], "before the first stale lookup")
        # (a batch whose rows the previous batches did not touch sees no difference)
        assert any(not torch.equal(e[0], p[0]) for e, p in zip(expected[first_stale:], plain[first_stale:])), \
            "no staleness"
        assert pipe.memory_stats()["peak_batches"] == 3, pipe.memory_stats()
        pipe.close()
        checked.append(f"semi_sync/{start}")
    # the model remaps the EC's ids: the EC's early lookup is dropped (its output dist
    # completed, its graph freed) and the EC looks up afresh, with the current weights
    modified = dict(setup, modify_on=tuple(range(world)))
    ref, ref_opt = build(world, modified)
    expected = plain_loop(ref, ref_opt, batches, semi_sync_from=0, ahead=("ebc",))
    dmp, pipe, got, warned = _run(TrainPipelineSemiSync, world, modified, batches, start_batch=0)
    assert_same_steps(got, expected, "semi-sync, EC modified")
    assert_same(weights(dmp), weights(ref), "semi-sync, EC modified")
    assert pipe.fallbacks == {"ec": len(batches)} and len(warned) == 1, (pipe.fallbacks, warned)
    pipe.close()
    checked.append("semi_sync/ec_falls_back")
    return checked


def failure_cases(rank: int, world: int) -> List[str]:
    """A step that raises on every rank, a bad id in one rank's batch, the data's end without
    execute_all_batches, a model that changes its KJT on one rank only: each ends cleanly on
    every rank, and the pipelines go on (or stop) as the plain loop does."""
    setup = dict(plan="mixed", ebc_opt="sgd", ec_opt="adam")
    checked = []
    for case in ("raise", "bad_id"):
        case_setup = dict(setup, raise_at=6) if case == "raise" else setup
        batches = make_batches(rank, world, 10, bad=(world - 1, 7) if case == "bad_id" else None)
        for cls, kwargs, semi in ((TrainPipelineSparseDist, {}, None), (TrainPipelineSemiSync, {"start_batch": 2}, 2)):
            ref, ref_opt = build(world, case_setup)
            expected = plain_loop(ref, ref_opt, batches, semi_sync_from=semi)
            failed = 5 if case == "raise" else 7
            assert [k for k, e in enumerate(expected) if isinstance(e, str)] == [failed], expected
            dmp, pipe, got, _ = _run(cls, world, case_setup, batches, **kwargs)
            assert_same_steps(got, expected, f"{case} {cls.__name__}")
            assert_same(weights(dmp), weights(ref), f"{case} {cls.__name__}")
            pipe.close()
            checked.append(f"{case}/{cls.__name__}/{got[failed]}")
    # the data ends: without execute_all_batches the batches fetched ahead are dropped
    batches = make_batches(rank, world, 6)
    for cls, ran in ((TrainPipelineBase, 6), (TrainPipelineSparseDist, 5), (TrainPipelineSemiSync, 5)):
        _, pipe, got, _ = _run(cls, world, setup, batches, execute_all_batches=False)
        assert len(got) == ran, (cls.__name__, len(got))
        pipe.close()
    checked.append("end_of_data")
    # a KJT changed on rank 0 only: every rank raises, every step, instead of hanging
    _, pipe, got, _ = _run(TrainPipelineSparseDist, world, dict(setup, modify_on=(0,)), batches)
    assert got == ["RuntimeError"] * len(batches), got
    pipe.close()
    dmp, opt = build(world, dict(setup, modify_on=(0,)))
    pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
    try:
        pipe.progress(iter(batches))
        raise AssertionError("no error")
    except RuntimeError as e:
        assert "distributed ahead" in str(e) and "every rank" in str(e), e
    pipe.close()
    checked.append("one_rank_modifies")
    # the same KJT object, its ids changed in place before the EC: the EC's dist sent ahead
    # is stale, seen by the tensors' version counters, and the EC falls back
    in_place = dict(setup, in_place=True)
    ref, ref_opt = build(world, in_place)
    expected = plain_loop(ref, ref_opt, make_batches(rank, world, 6))  # fresh batches: they are changed
    dmp, pipe, got, _ = _run(TrainPipelineSparseDist, world, in_place, make_batches(rank, world, 6))
    assert_same_steps(got, expected, "ids changed in place")
    assert_same(weights(dmp), weights(ref), "ids changed in place")
    assert pipe.fallbacks == {"ec": 6}, pipe.fallbacks
    pipe.close()
    checked.append("changed_in_place")
    return checked


def overlap_cases(rank: int, world: int) -> List[int]:
    """Where the all-to-alls run: in the plain loop each sharded module's input dist (the
    agreement and the lengths and ids exchanges: 3 all-to-alls) runs inside the model's
    forward; under TrainPipelineSparseDist they run outside it (batch i+1's, beside batch
    i's step), so each forward holds 3 fewer per module, and the run as many in all."""
    setup = dict(plan="mixed", ebc_opt="sgd", ec_opt="adam")
    batches = make_batches(rank, world, 5)
    real = dist.all_to_all_single
    counts = []

    def run(train):
        log = []

        def logged(*args, **kwargs):
            log.append("a2a")
            return real(*args, **kwargs)

        dmp, opt = build(world, setup)
        dmp.module.register_forward_pre_hook(lambda *_: log.append("fwd"))
        dmp.module.register_forward_hook(lambda *_: log.append("end"))
        dist.all_to_all_single = logged
        try:
            train(dmp, opt)
        finally:
            dist.all_to_all_single = real
        inside, depth = [], 0
        for item in log:
            if item == "fwd":
                inside.append(0)
                depth = 1
            elif item == "end":
                depth = 0
            elif depth:
                inside[-1] += 1
        return inside, log.count("a2a")

    plain_inside, plain_total = run(lambda dmp, opt: plain_loop(dmp, opt, batches))
    piped_inside, piped_total = run(lambda dmp, opt: run_pipeline(TrainPipelineSparseDist(dmp, opt, "cpu"), batches))
    assert len(plain_inside) == len(piped_inside) == len(batches)
    assert [p - q for p, q in zip(plain_inside, piped_inside)] == [3 * 2] * len(batches), (plain_inside, piped_inside)
    assert plain_total == piped_total, (plain_total, piped_total)
    counts.extend(piped_inside)
    return counts
