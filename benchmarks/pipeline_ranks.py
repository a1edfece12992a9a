"""The pipeline benchmark on each rank: build every provider, warm it up, then time blocks of
steps, providers and delays taking turns; rank 0 combines every rank's samples.

Every rank draws the same tables and the same global batches (``W * B`` samples) from the
seed and feeds its slice, samples ``[rank * B, (rank + 1) * B)``, through a data iterator that
cycles over ``--batches`` of them, making a fresh batch object each time as a loader would.

Why blocks, not one step at a time: a pipeline leaves collectives in flight when ``progress``
returns (the next batch's input distribution). Were providers to alternate step by step, those
collectives would complete during the other providers' steps, and every pipeline would hide
the whole delay for free. So a turn is a block: one untimed step that absorbs whatever
finished during the others' turns, then ``--steps`` timed steps back to back. Turns go
forward then backward over every (provider, delay), ``--repeats`` rounds, so slow drift of a
noisy machine spreads over all alike. A step's time is the slowest rank's (ranks step in
lockstep through their collectives).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .collectives import route_ddp_allreduce
from .comm_delay import DelayedCollectives
from .providers.pipeline import PipelineProvider, dense_and_labels, pipeline_providers
from .providers.sharded import RankEnv, local_batch
from .runner import _fail, quiet
from .timing import MemoryProbe, quantiles
from .workload import Batch, Workload, make_batches, reference_tables

WARMUP_STEPS = 3  # fill the pipeline (up to 3 batches in flight) and settle


@dataclass
class Job:
    workload: Workload            # batch_size: each rank's B
    pipelines: Sequence[str]
    libraries: Sequence[str]
    delays_ms: Sequence[float]
    rounds: int
    steps: int
    batches: int
    dense_in: int
    seed: int
    device: str
    sharding: str
    progress: bool
    undelayed: Sequence[str] = ()   # collectives counted but never delayed


def _agree(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _first_error(values: Sequence[Optional[str]]) -> Optional[str]:
    bad = [(r, e) for r, e in enumerate(values) if e]
    return f"rank {bad[0][0]}: {bad[0][1]}" if bad else None


class _Feed:
    """An endless iterator over this rank's batches in the provider's types; counts what it handed out."""

    def __init__(self, provider: PipelineProvider, local, w: Workload, dense) -> None:
        self.provider, self.local, self.w, self.dense = provider, local, w, dense
        self.taken = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        i = self.taken % len(self.local)
        self.taken += 1
        return self.provider.make_batch(self.local[i], self.w, *self.dense[i])


def _pin(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return t.pin_memory() if t is not None and device.type == "cuda" else t


def _pinned(batch: Batch, device: torch.device) -> Batch:
    return dataclasses.replace(batch, values=_pin(batch.values, device), lengths=_pin(batch.lengths, device),
                               offsets=_pin(batch.offsets, device), weights=_pin(batch.weights, device))


def _batch_bytes(local, dense) -> int:
    size = 0
    for b, (x, y) in zip(local, dense):
        size += sum(t.numel() * t.element_size() for t in (b.values, b.lengths, b.offsets, x, y))
        size += 0 if b.weights is None else b.weights.numel() * b.weights.element_size()
    return size // len(local)


def run_on_rank(job: Job, env: RankEnv, say: Callable[[str], None]) -> Optional[dict]:
    """Run the job on this rank; rank 0 returns ``{"rows": [...], "skipped": {...}}``, the others None."""
    w, rank, world = job.workload, env.rank, env.world
    wg = w.replace(batch_size=world * w.batch_size, mode="train")
    rows = slice(rank * w.batch_size, (rank + 1) * w.batch_size)
    with quiet():
        tables = reference_tables(wg, job.seed)
        # the batches start on the host, as a loader hands them: each pipeline (and the plain loop)
        # copies them to the device itself; pinned on CUDA, so a side stream's copy can overlap
        host = wg.replace(device="cpu")
        local = [_pinned(local_batch(b, host.replace(batch_size=w.batch_size), rank), env.device)
                 for b in make_batches(host, job.batches, job.seed)]
        dense = [(_pin(x[rows].contiguous(), env.device), _pin(y[rows].contiguous(), env.device))
                 for x, y in dense_and_labels(wg, job.dense_in, job.batches, job.seed)]
        lineup = pipeline_providers(env, job.pipelines, job.libraries)
        skipped: Dict[str, str] = {}
        active: List[PipelineProvider] = []
        for p in lineup:
            reason = p.skip_reason(w)
            if reason is None:
                say(f"build {p.name}")
                try:
                    p.build(tables, w, job.dense_in, job.seed)
                    route_ddp_allreduce(p.model)  # the dense all-reduce through dist.all_reduce: delayed too
                except Exception as e:
                    reason = _fail(e, "setup failed")
            reason = _first_error(_agree(reason))
            if reason:
                skipped[p.name] = reason
                p.release()
            else:
                active.append(p)
        del tables
        feeds = {p.name: _Feed(p, local, w, dense) for p in active}
        with DelayedCollectives(cuda=env.device.type == "cuda", undelayed=job.undelayed) as comm:
            warm = _warm_up(active, feeds, comm, skipped, say)
            _memory(active, feeds, env, comm, warm)
            records = _time(active, feeds, job, comm, say)
        for p in active:
            p.release()
    gathered = _agree(records)
    if rank != 0:
        return None
    batch_bytes = _batch_bytes(local, dense)
    return {"rows": _combine(active, gathered, warm, batch_bytes), "skipped": skipped, "batch_bytes": batch_bytes}


def _warm_up(active: List[PipelineProvider], feeds, comm: DelayedCollectives, skipped, say) -> dict:
    """``WARMUP_STEPS`` steps per provider, no delay; returns per provider its first output
    (the same batch and the same starting weights for all) and the most batches it held after
    a step (taken from the feed, not yet returned)."""
    warm = {}
    for p in list(active):
        say(f"warm up {p.name}")
        feed, error, first, held = feeds[p.name], None, None, 0
        comm.delay_ms, comm.active = 0.0, True
        try:
            for i in range(WARMUP_STEPS):
                out = p.runner.progress(feed)
                first = out.detach().float().cpu() if first is None else first
                held = max(held, feed.taken - (i + 1))
        except Exception as e:
            error = _fail(e, "failed in warm-up")
        finally:
            comm.active = False
        error = _first_error(_agree(error))
        if error:
            skipped[p.name] = error
            active.remove(p)
            p.release()
            continue
        warm[p.name] = {"first_output": first, "held": held}
    return warm


def _memory(active: List[PipelineProvider], feeds, env: RankEnv, comm: DelayedCollectives, warm: dict) -> None:
    """Per provider, after every warm-up: the extra memory at the peak of two steady steps over
    what was in use before them (the batches it holds included there, not here)."""
    probe = MemoryProbe(env.device.type)
    for p in active:
        comm.delay_ms, comm.active = 0.0, True
        try:
            warm[p.name]["peak_mb"] = probe.measure(lambda p=p: [p.runner.progress(feeds[p.name]) for _ in range(2)])
        finally:
            comm.active = False


def _time(active: List[PipelineProvider], feeds, job: Job, comm: DelayedCollectives, say) -> Dict[tuple, list]:
    """Per (provider, delay): this rank's ``(step ms, blocked ms, {collective: calls}, {collective:
    blocked ms})`` per timed step."""
    units = [(p, d) for d in job.delays_ms for p in active]
    records: Dict[tuple, list] = {(p.name, d): [] for p, d in units}
    say(f"time {job.rounds} rounds of {job.steps} steps for {len(units)} (provider, delay) pairs")
    for turn in range(job.rounds):
        for p, delay in (units if turn % 2 == 0 else units[::-1]):
            feed = feeds[p.name]
            comm.delay_ms = delay
            dist.barrier()  # not a wrapped collective: never delayed
            comm.active = True
            try:
                p.runner.progress(feed)  # absorbs what completed while the others ran
                for _ in range(job.steps):
                    comm.reset()
                    begin = _now(p)
                    p.runner.progress(feed)
                    ms = (_now(p) - begin) * 1e3
                    records[(p.name, delay)].append((ms, comm.blocked_s * 1e3, dict(comm.calls),
                                                     {k: v * 1e3 for k, v in comm.blocked_by_name.items()}))
            finally:
                comm.active = False
    return records


def _now(p: PipelineProvider) -> float:
    import time

    if p.env.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _combine(active: List[PipelineProvider], gathered: List[Dict[tuple, list]], warm: dict,
             batch_bytes: int) -> List[dict]:
    """Rank 0: one row per (provider, delay) from every rank's samples."""
    out = []
    by_name = {p.name: p for p in active}
    reference = next((n for n in ("jaggedrec_none", "torchrec_none") if n in warm), None)
    for (name, delay), mine in gathered[0].items():
        per_rank = [g[(name, delay)] for g in gathered]
        steps = [max(s[k][0] for s in per_rank) for k in range(len(mine))]
        median, p20, p80 = quantiles(steps)
        shares = [sum(x[1] for x in s) / sum(x[0] for x in s) for s in per_rank]
        p = by_name[name]
        first = warm[name]["first_output"]
        err = None if reference is None else float((first - warm[reference]["first_output"]).abs().max())
        out.append({"provider": name, "library": p.library, "pipeline": p.pipeline, "delay_ms": delay,
                    "median_ms": median, "p20_ms": p20, "p80_ms": p80, "samples_ms": steps,
                    "wait_share": sum(shares) / len(shares), "wait_share_by_rank": shares,
                    "collectives_per_step": sum(sum(x[2].values()) for x in mine) / len(mine),
                    "collectives_by_name": _mean_by_name([x[2] for x in mine]),
                    "blocked_ms_by_name": _mean_by_name([x[3] for x in mine]),
                    "peak_mb": warm[name]["peak_mb"], "batches_held": warm[name]["held"],
                    "held_mb": warm[name]["held"] * batch_bytes / 2**20,
                    "first_output_err": err, "first_output_vs": reference, "plan": p.plan})
    _hidden(out)
    return out


def _mean_by_name(steps: List[Dict[str, float]]) -> Dict[str, float]:
    """Per collective name, the mean over steps (rank 0's)."""
    return {k: sum(s.get(k, 0) for s in steps) / len(steps) for k in sorted({k for s in steps for k in s})}


def _hidden(rows: List[dict]) -> None:
    """``delay_cost_ms``: a provider's median at the delay minus its median at 0 ms (what the
    delay added to its step); ``hidden``: the share of the ``none`` loop's cost (same library,
    same delay) that this pipeline does not pay, ``1 - cost / cost(none)``. ``hidden_p20``: the
    same from the p20s, the steps a busy machine slowed least. Both need 0 among the delays."""
    for key, out in (("median_ms", "hidden"), ("p20_ms", "hidden_p20")):
        at = {(r["provider"], r["delay_ms"]): r[key] for r in rows}
        for r in rows:
            r[out] = None
            if key == "median_ms":
                r["delay_cost_ms"] = None
            base = at.get((r["provider"], 0.0))
            if base is None or r["delay_ms"] == 0:
                continue
            cost = r[key] - base
            if key == "median_ms":
                r["delay_cost_ms"] = cost
            plain = f"{r['library']}_none"
            if (plain, 0.0) in at and (plain, r["delay_ms"]) in at:
                cost_none = at[(plain, r["delay_ms"])] - at[(plain, 0.0)]
                if cost_none > 0:
                    r[out] = 1.0 - cost / cost_none
