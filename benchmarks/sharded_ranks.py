"""One workload on every rank of the sharded benchmark, in the single-process runner's order:
build, check against the reference, warm up, then time one sample per provider per turn over
rotating batches; rank 0 gathers every rank's samples and returns the results.

Every rank draws the same tables and the same global batches (``W * B`` bags per feature)
from the seed, and feeds its slice, samples ``[rank * B, (rank + 1) * B)``. The reference is
the ``nn.EmbeddingBag`` loop on the global batch: each sharded provider's rows on a rank must
match the reference's rows of that rank's slice, and the single-process baseline (rank 0
only) all of them, else the provider is ``wrong`` and not timed. The ranks agree on every
such decision (``_agree``), so that they all time the same providers in the same steps.

A sharded sample is one step on every rank, started together after a barrier; its time is
the slowest rank's (the step is done when every rank is). While a baseline sample runs on
rank 0, the other ranks wait at a barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .providers.base import Provider
from .providers.loops import EmbeddingBagLoop
from .providers.sharded import BASELINE, RankEnv, local_batch, sharded_providers
from .runner import (TOLERANCES, Options, ProviderResult, WorkloadResult, _derive_metrics, _fail, _max_abs_err,
                     quiet)
from .collectives import route_ddp_allreduce
from .sharded_comm import CollectiveCounter
from .timing import Clock, interleaved_order, plan_samples
from .workload import Workload, bytes_per_step, make_batches, reference_tables


@dataclass
class ShardedResult(ProviderResult):
    """A provider's result over all ranks. ``samples_ms``: per sample, the slowest rank's step."""

    vs_1proc: Optional[float] = None                  # jaggedrec_1proc's median / this median
    bytes_sent_per_rank: Optional[float] = None       # per step, mean over ranks
    bytes_sent_by_rank: List[float] = field(default_factory=list)
    wait_share: Optional[float] = None                # time in collectives / step time, mean over ranks
    wait_share_by_rank: List[float] = field(default_factory=list)
    state_mb_by_rank: List[float] = field(default_factory=list)
    plan: str = ""                                    # sharding types and how many tables got each


def _agree(value) -> list:
    """Every rank's ``value``, rank by rank, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _first_error(errors: Sequence[Optional[str]]) -> Optional[str]:
    bad = [(r, e) for r, e in enumerate(errors) if e]
    return f"rank {bad[0][0]}: {bad[0][1]}" if bad else None


def run_on_rank(w: Workload, wanted: Sequence[str], options: Options, env: RankEnv, counter: CollectiveCounter,
                progress: Callable[[str], None]) -> Optional[WorkloadResult]:
    """Run ``w`` (``w.batch_size`` = B, the local batch) on this rank; rank 0 returns the
    result over all ranks, the others None."""
    world, rank = env.world, env.rank
    wg = w.replace(batch_size=world * w.batch_size)  # the global batch
    lineup = [p for p in sharded_providers(env) if p.name in wanted]
    results: Dict[str, ShardedResult] = {}
    with quiet():
        for p in lineup:
            reason = p.skip_reason(wg)
            results[p.name] = ShardedResult("skipped", reason) if reason else ShardedResult("ok")
        tables = reference_tables(wg, options.seed)
        batches = make_batches(wg, options.batches, options.seed)
        local = [local_batch(b, w, rank) for b in batches]
        moved = sum(bytes_per_step(wg, b.ids_per_feature) for b in batches) / len(batches)
        progress("reference")
        loop = EmbeddingBagLoop()
        loop.build(tables, wg)
        with torch.no_grad():
            refs = [loop.forward(b).float() for b in batches]  # [W * B, total_dim]
        loop.release()
        rows = slice(rank * w.batch_size, (rank + 1) * w.batch_size)
        # per provider: the batches it steps on this rank, and the reference rows they give
        feeds = {p.name: (batches, refs) if p.name == BASELINE else (local, [r[rows] for r in refs]) for p in lineup}
        active = _build(lineup, tables, wg, results, env, progress)
        del tables
        active = _verify(active, feeds, results, TOLERANCES[w.dtype], env, progress)
        records = _time(active, feeds, options, results, env, counter, progress)
        for p in active:
            p.release()
    gathered = _agree(records)
    if rank != 0:
        return None
    for name, per_rank in zip(records, zip(*[g.values() for g in gathered])):
        _combine(results[name], per_rank, name == BASELINE)
    _derive_metrics(results, moved, None, BASELINE)
    for r in results.values():  # the runner's "vs loop" is, here, the ratio to the single process
        r.vs_1proc, r.speedup_vs_loop = r.speedup_vs_loop, None
    return WorkloadResult(w, results, moved)


def _runs_here(p: Provider, rank: int) -> bool:
    return p.name != BASELINE or rank == 0


def _build(lineup, tables, wg, results, env: RankEnv, progress) -> List[Provider]:
    active = []
    for p in lineup:
        if results[p.name].status != "ok":
            continue
        progress(f"build {p.name}")
        error, state_mb = None, 0.0
        if _runs_here(p, env.rank):
            try:
                p.build(tables, wg)
                route_ddp_allreduce(p.module)  # TorchRec's data-parallel tables: DDP's all-reduce, counted
                state_mb = p.state_bytes() / 2**20
            except Exception as e:
                error = _fail(e, "setup failed")
        agreed = _agree((error, state_mb))
        error = _first_error([e for e, _ in agreed])
        if error:
            results[p.name] = ShardedResult("skipped", error)
            p.release()
            continue
        results[p.name].note = getattr(p, "note", "")
        results[p.name].plan = getattr(p, "plan", "")
        results[p.name].state_mb_by_rank = [mb for _, mb in agreed] if p.name != BASELINE else [agreed[0][1]]
        results[p.name].state_mb = max(results[p.name].state_mb_by_rank)
        active.append(p)
    return active


def _verify(active, feeds, results, tol: float, env: RankEnv, progress) -> List[Provider]:
    progress("verify")
    kept = []
    for p in active:
        worst, error = None, None
        if _runs_here(p, env.rank):
            try:
                for batch, ref in zip(*feeds[p.name]):
                    with torch.no_grad():
                        err = _max_abs_err(p.forward(batch), ref, tol, tol)
                    if err is not None:
                        worst = max(worst or 0.0, err)
            except Exception as e:
                error = _fail(e, "failed in verification")
        agreed = _agree((error, worst))
        error = _first_error([e for e, _ in agreed])
        off = [(r, x) for r, (_, x) in enumerate(agreed) if x is not None]
        r = results[p.name]
        if error:
            results[p.name] = ShardedResult("skipped", error, r.note, plan=r.plan)
        elif off:
            top = max(x for _, x in off)
            results[p.name] = ShardedResult(
                "wrong", f"rows differ from the unsharded reference's on ranks {[q for q, _ in off]}: max abs err "
                         f"{top:.3g} (tol {tol:g} abs + {tol:g} rel)", r.note, max_abs_err=top, plan=r.plan)
        if results[p.name].status == "ok":
            kept.append(p)
        else:
            p.release()
    return kept


def _time(active, feeds, options: Options, results, env: RankEnv, counter: CollectiveCounter,
          progress) -> Dict[str, List[tuple]]:
    """Warm up, then the timed samples. Returns, per provider, this rank's ``(step ms, bytes
    sent, ms in collectives)`` per sample (empty where the provider does not run here)."""
    clock = Clock(env.device.type)
    samples = []
    for p in list(active):
        progress(f"warm up {p.name}")
        last, error = 0.0, None
        if _runs_here(p, env.rank):
            try:
                last = [clock.time_ms(lambda: p.step(b)) for b in feeds[p.name][0]][-1]
                p.clear_grads()
            except Exception as e:
                error = _fail(e, "failed in warm-up")
        agreed = _agree((error, last))
        error = _first_error([e for e, _ in agreed])
        if error:
            results[p.name] = ShardedResult("skipped", error, results[p.name].note, plan=results[p.name].plan)
            active.remove(p)
            p.release()
            continue
        samples.append(plan_samples(max(t for _, t in agreed), options.repeats))
    records: Dict[str, List[tuple]] = {p.name: [] for p in active}
    counters = [0] * len(active)
    count = min(samples) if samples else 0  # one count for all, one sample per turn
    progress(f"time {count} interleaved samples each")
    for i in interleaved_order(len(active), count):
        p = active[i]
        here = _runs_here(p, env.rank)
        batch = feeds[p.name][0][counters[i] % len(feeds[p.name][0])]
        counters[i] += 1
        if p.name != BASELINE:
            dist.barrier()  # start together: a sample is one step of every rank
        if here:
            counter.reset()
            counter.active = True
            ms = clock.time_ms(lambda: p.step(batch))
            counter.active = False
            records[p.name].append((ms, counter.bytes_sent, counter.wait_s * 1e3))
            p.clear_grads()
        if p.name == BASELINE:
            dist.barrier()  # the other ranks waited here while rank 0 ran the baseline
    return records


def _combine(r: ShardedResult, per_rank: Sequence[List[tuple]], baseline: bool) -> None:
    """Rank 0: one result from every rank's ``(ms, bytes, collective ms)`` samples."""
    if r.status != "ok":
        return
    if baseline:  # one process: no collectives
        r.samples_ms = [ms for ms, _, _ in per_rank[0]]
        return
    r.samples_ms = [max(s[k][0] for s in per_rank) for k in range(len(per_rank[0]))]
    r.bytes_sent_by_rank = [sum(b for _, b, _ in s) / len(s) for s in per_rank]
    r.wait_share_by_rank = [sum(c for _, _, c in s) / sum(ms for ms, _, _ in s) for s in per_rank]
    r.bytes_sent_per_rank = sum(r.bytes_sent_by_rank) / len(per_rank)
    r.wait_share = sum(r.wait_share_by_rank) / len(per_rank)
