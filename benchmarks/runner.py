"""One workload, every provider: build, verify against the loop, warm up, time, measure.

The order of events, and why:

1. build every provider from the same reference tables (a failure skips that provider);
2. verify: each provider's forward on every batch must match the ``nn.EmbeddingBag`` loop
   (the ``nn.Embedding`` loop for the unpooled collection, :data:`UNPOOLED`; the fp32
   module for quantized tables, :data:`QUANT`) within the module's tolerance
   (the dtype's, or the quantization's rounding bound), else it is reported ``wrong`` and
   never timed. In backward mode the weight gradient is checked too, through
   ``sum(grad * W) == sum(grad_out * out)``, which holds for any linear lookup and needs no
   knowledge of the provider's layout;
3. warm up on every batch (first-call costs: allocations, page faults, compilation);
4. measure one step's peak memory, untimed;
5. time one sample per provider per turn (``timing.interleaved_order``), the same count for
   every provider, rotating over the batches.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .providers.base import Provider, Tolerance
from .providers.quant import BASELINE as QUANT_BASELINE
from .providers.quant import quant_tolerance
from .timing import Clock, MemoryProbe, interleaved_order, plan_samples, quantiles
from .contention import busy_processes
from .workload import (Batch, Workload, bytes_per_step, ec_bytes_per_step, make_batches, make_ec_batches,
                       reference_tables)

# abs and rel tolerance of a provider's output against the loop's, by table dtype
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
BASELINE = "eb_loop"


def dtype_tolerance(w: Workload, tables: Sequence[torch.Tensor], batch: Batch) -> Tolerance:
    """The float dtype's abs and rel tolerance (:data:`TOLERANCES`), the same for every element."""
    tol = TOLERANCES[w.dtype]
    return tol, tol, f"{tol:g} abs"


@dataclass(frozen=True)
class Module:
    """What differs between the module benchmarks: the baseline provider's name (the first
    provider, the reference every output is checked against and every ratio is taken to),
    how batches are drawn, how a step's bytes are counted, and how far an output may be from
    the baseline's (``tolerance(w, reference_tables, batch)``)."""

    name: str
    baseline: str
    make_batches: Callable[[Workload, int, int], List[Batch]]
    bytes_per_step: Callable[[Workload, Sequence[int]], float]
    tolerance: Callable[[Workload, Sequence[torch.Tensor], Batch], Tolerance] = dtype_tolerance


POOLED = Module("ebc", BASELINE, make_batches, bytes_per_step)
UNPOOLED = Module("ec", "embedding_loop", make_ec_batches, ec_bytes_per_step)
# quantized tables (--dtype int8|int4): the fp32 module the quantized ones are built from is
# the baseline, and an output may be off by the quantization's rounding bound
QUANT = Module("quant", QUANT_BASELINE, make_batches, bytes_per_step, quant_tolerance)


@dataclass
class Options:
    repeats: int = 10       # timed samples per provider (fewer for steps over ~1 s)
    batches: int = 3        # distinct input batches the samples rotate over
    seed: int = 0


@dataclass
class ProviderResult:
    status: str                      # "ok", "skipped" or "wrong"
    reason: Optional[str] = None     # why skipped or wrong
    note: str = ""                   # how this provider runs this mode, when it differs
    samples_ms: List[float] = field(default_factory=list)
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    gbps: Optional[float] = None
    pct_of_copy_bw: Optional[float] = None
    speedup_vs_loop: Optional[float] = None
    peak_mem_mb: Optional[float] = None   # state_mb + step_mem_mb
    table_bytes: Optional[int] = None     # parameters and buffers: the tables as this provider stores them
    state_mb: Optional[float] = None      # parameters, buffers, optimizer state
    step_mem_mb: Optional[float] = None   # extra memory at the peak of one step
    max_abs_err: Optional[float] = None


@dataclass
class WorkloadResult:
    workload: Workload
    providers: Dict[str, ProviderResult]
    bytes_per_step: float  # mean over the batches, by workload.bytes_per_step


@contextlib.contextmanager
def quiet():
    """Silence Python warnings and library log lines (FBGEMM, TorchRec, torch) during a run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _fail(e: BaseException, when: str) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{when}: {type(e).__name__}: {text}"


def _max_abs_err(out: torch.Tensor, ref: torch.Tensor, abs_tol, rel_tol: float) -> Optional[float]:
    """Max abs error if ``out`` is outside ``|out - ref| <= abs_tol + rel_tol * |ref|``, else None."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    out, ref = out.detach().double(), ref.double()
    err = (out - ref).abs()
    if bool((err <= abs_tol + rel_tol * ref.abs()).all()):
        return None
    return float(err.nan_to_num(float("inf")).max())


def _gradient_error(p: Provider, batch: Batch, ref_out: torch.Tensor, tol: float) -> Optional[str]:
    """Backward mode: check ``<dL/dW, W> == <grad_out, out>`` (the lookup is linear in W)."""
    p.clear_grads()
    out = p.forward(batch)
    out.backward(batch.grad_out.to(out.dtype))
    got = torch.zeros((), dtype=torch.float64, device=out.device)
    for w in p.grad_params():
        if w.grad is not None:
            grad = w.grad.to_dense() if w.grad.is_sparse else w.grad
            got += (grad.double() * w.detach().double()).sum()
    g = batch.grad_out.double()
    expected = (g * ref_out.double()).sum()
    scale = (g.abs() * ref_out.double().abs()).sum() + 1e-30
    p.clear_grads()
    rel = float((got - expected).abs() / scale)
    return None if rel <= tol else f"weight gradient check off by {rel:.2e} (relative; tol {tol:g})"


def run_workload(w: Workload, providers: Sequence[Provider], options: Options, copy_gbps: Optional[float],
                 progress: Callable[[str], None] = lambda msg: None, module: Module = POOLED) -> WorkloadResult:
    """Every provider's result on ``w``; the first provider must be ``module``'s baseline
    (``eb_loop`` for the bag collection), the reference."""
    baseline = module.baseline
    if not providers or providers[0].name != baseline:
        raise ValueError(f"the first provider must be the {baseline} reference")
    results: Dict[str, ProviderResult] = {}
    active: List[Provider] = []
    with quiet():
        for p in providers:
            reason = p.skip_reason(w)
            if reason is None and w.mode == "train" and w.optimizer not in p.optimizers:
                reason = f"trains with {' or '.join(p.optimizers)} only, not {w.optimizer}"
            results[p.name] = ProviderResult("skipped", reason) if reason else ProviderResult("ok")
        tables = reference_tables(w, options.seed)
        batches = module.make_batches(w, options.batches, options.seed)
        tolerances = [module.tolerance(w, tables, b) for b in batches]
        # samples rotate evenly over the batches, so their mean bytes goes with the median time
        moved = sum(module.bytes_per_step(w, b.ids_per_feature) for b in batches) / len(batches)
        for p in providers:
            if results[p.name].status != "ok":
                continue
            progress(f"build {p.name}")
            try:
                p.build(tables, w)
                results[p.name].state_mb = p.state_bytes() / 2**20
                results[p.name].table_bytes = p.table_bytes()
                results[p.name].note = p.note
                active.append(p)
            except Exception as e:
                if p.name == baseline:
                    raise
                results[p.name] = ProviderResult("skipped", _fail(e, "setup failed"))
                p.release()
        del tables
        active = _verify(w, active, batches, tolerances, results, progress, baseline)
        del tolerances
        with busy_processes(w.busy):
            _time_all(w, active, batches, options, results, progress, baseline)
        for p in active:
            p.release()
        del active, batches
        gc.collect()
        if w.device == "cuda":
            torch.cuda.empty_cache()
    _derive_metrics(results, moved, copy_gbps, baseline)
    return WorkloadResult(w, results, moved)


def _verify(w, active, batches, tolerances, results, progress, baseline=BASELINE) -> List[Provider]:
    progress("verify")
    with torch.no_grad():
        refs = [active[0].forward(b).float() for b in batches]
    kept = [active[0]]
    for p in active[1:]:
        try:
            worst, factor = None, p.tolerance_factor
            for b, ref, (abs_tol, rel_tol, _) in zip(batches, refs, tolerances):
                with torch.no_grad():
                    err = _max_abs_err(p.forward(b), ref, factor * abs_tol, rel_tol)
                if err is not None:
                    worst = max(worst or 0.0, err)
            if worst is not None:
                _, rel_tol, what = tolerances[0]
                tol = f"tol {'' if factor == 1 else f'{factor:g}x '}{what} + {rel_tol:g} rel"
                results[p.name] = ProviderResult("wrong", f"output differs from {baseline}: max abs err {worst:.3g} "
                                                          f"({tol})", p.note, max_abs_err=worst)
            elif w.mode == "backward":
                grad_err = _gradient_error(p, batches[0], refs[0], TOLERANCES[w.dtype])
                if grad_err is not None:
                    results[p.name] = ProviderResult("wrong", grad_err, p.note)
        except Exception as e:
            results[p.name] = ProviderResult("skipped", _fail(e, "failed in verification"), p.note)
        if results[p.name].status == "ok":
            kept.append(p)
        else:
            p.release()
    return kept


def _time_all(w, active, batches, options, results, progress, baseline=BASELINE) -> None:
    clock, probe = Clock(w.device), MemoryProbe(w.device)
    samples = []
    for p in list(active):
        progress(f"warm up {p.name}")
        try:
            last = [clock.time_ms(lambda: p.step(b)) for b in batches][-1]
            p.clear_grads()  # else the last warm-up's gradient is in the baseline and the step reuses it
            results[p.name].step_mem_mb = probe.measure(lambda: p.step(batches[0]))
            p.clear_grads()
            samples.append(plan_samples(last, options.repeats))
        except Exception as e:
            if p.name == baseline:
                raise
            results[p.name] = ProviderResult("skipped", _fail(e, "failed in warm-up"), p.note)
            active.remove(p)
            p.release()
    counters = [0] * len(active)
    # one count for all (the fewest any provider planned): each sample is a turn of its own
    count = min(samples) if samples else 0
    progress(f"time {count} interleaved samples each")
    for i in interleaved_order(len(active), count):
        p = active[i]
        if results[p.name].status != "ok":
            continue
        batch = batches[counters[i] % len(batches)]
        counters[i] += 1
        try:
            results[p.name].samples_ms.append(clock.time_ms(lambda: p.step(batch)))
        except Exception as e:
            if p.name == baseline:
                raise
            results[p.name] = ProviderResult("skipped", _fail(e, "failed while timed"), p.note)
        p.clear_grads()  # free dense gradients before the next provider runs


def _derive_metrics(results: Dict[str, ProviderResult], moved: float, copy_gbps: Optional[float],
                    baseline_name: str = BASELINE) -> None:
    baseline = results[baseline_name]
    for r in results.values():
        if r.status != "ok" or not r.samples_ms:
            continue
        r.median_ms, r.p20_ms, r.p80_ms = quantiles(r.samples_ms)
        r.gbps = moved / (r.median_ms * 1e-3) / 1e9
        if copy_gbps:
            r.pct_of_copy_bw = 100.0 * r.gbps / copy_gbps
        if baseline.median_ms:
            r.speedup_vs_loop = baseline.median_ms / r.median_ms
        if r.state_mb is not None and r.step_mem_mb is not None:
            r.peak_mem_mb = r.state_mb + r.step_mem_mb
