"""``jaggedrec-bench --world-size N --pipeline none,sparse_dist``: the train pipeline benchmark.

It spawns N ranks (gloo on CPU; NCCL on CUDA, one GPU per rank) and trains the same small
DLRM-like model (``providers/pipeline.py``) on the same batches through each asked pipeline,
jaggedrec's (``jaggedrec.distributed.train_pipeline`` over jaggedrec's DMP) beside TorchRec's
(``torchrec.distributed.train_pipeline`` over TorchRec's DMP; skipped with the reason when
TorchRec is not importable). ``none`` (the plain loop) always runs: it is what the others
are measured against.

``--comm-delay-ms 0,20`` delays every collective by 20 ms from issue to completion
(``comm_delay.py``), then by none, in the same run: two cores cannot show overlap from
compute alone, a delay can. Per provider and delay it reports the median step time (the
slowest rank's), the share of the step spent blocked on collectives, the collectives per
step, what the delay added to the step, the share of the plain loop's added time the
pipeline hides, the extra memory at the peak of a step and the batches held between steps.

Exit status: 0, 1 when a rank failed or ran out of time, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import List, Optional, Sequence

import torch

from jaggedrec.testing import RankFailure, run_ranks

from .comm_delay import COLLECTIVES
from .flags import build_parser, select_providers
from .presets import preset_workloads
from .providers.pipeline import LIBRARIES, PIPELINES
from .providers.sharded import RankEnv
from .report import _fmt, aligned_rows, machine_info
from .workload import Workload

#: the default model: 8 tables of 10k rows, dim 16, 256 samples per rank, ~4 ids per bag
DEFAULT = Workload(tables=8, num_embeddings=10_000, dims=(16,), batch_size=256, pooling_factor=4.0,
                   bag_size="random", mode="train")

LEGEND = ("median ms: one progress() call, the slowest rank's, median over the timed steps. wait: time blocked "
          "inside collectives and their wait() over the step time, mean over ranks. colls/step: wrapped collective "
          "calls per step (rank 0). +delay ms: this median minus the same provider's at 0 ms. hidden: 1 - "
          "(+delay ms) / (+delay ms of the same library's none loop), the share of the delay the loop pays that "
          "this pipeline does not; hidden p20: the same from the p20s, the steps a busy machine slowed least. "
          "step MB: extra memory at the peak of two steady steps over what was in use before them ({memory}). "
          "held: most batches taken from the loader and not yet returned after a step (in flight), and their bytes "
          "on this rank (held MB). out err: max |first step's output - {reference}'s| (same batch, same starting "
          "weights).")


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    """The flags the pipeline benchmark adds to ``jaggedrec-bench``'s (listed by ``--help`` too)."""
    g = p.add_argument_group("train pipelines (with --world-size N; --world-size 2 --pipeline none --help for "
                             "details)")
    g.add_argument("--pipeline", type=_choices(PIPELINES),
                   help=f"comma list of {', '.join(PIPELINES)}: train a small DLRM-like model over N ranks through "
                        f"each, jaggedrec's and TorchRec's (none, the plain loop, always runs)")
    g.add_argument("--comm-delay-ms", type=_delays,
                   help="delay every collective by this many ms from issue to completion (a comma list runs "
                        "each; include 0 to see what the delay adds; default 0)")
    g.add_argument("--comm-undelayed", type=_choices(COLLECTIVES), default=[],
                   help="comma list of collectives to leave undelayed (still counted), e.g. all_reduce: which "
                        "of them a pipeline still pays for")
    g.add_argument("--steps", type=int, default=8, help="timed steps per turn of the pipeline benchmark (default 8)")
    g.add_argument("--dense-features", type=int, default=13, help="dense inputs per sample (default 13)")


def _choices(allowed: Sequence[str]):
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def _delays(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"delays are >= 0 ms; got {text!r}")
    return list(dict.fromkeys(values))


def build_pipeline_parser() -> argparse.ArgumentParser:
    p = build_parser("ebc")
    add_pipeline_flags(p)
    p.prog = "jaggedrec-bench --world-size N --pipeline P"
    p.description = ("Train a small DLRM-like model over N ranks through jaggedrec's and TorchRec's train pipelines "
                     "on the same batches; --providers picks the libraries (jaggedrec, torchrec), --repeats the "
                     "rounds of turns, --sharding the tables' plan (default table_wise).")
    p.epilog = ("examples:\n  jaggedrec-bench --world-size 2 --pipeline none,sparse_dist\n"
                "  jaggedrec-bench --world-size 2 --pipeline none,base,sparse_dist,semi_sync --comm-delay-ms 0,20\n"
                "  jaggedrec-bench --world-size 1 --pipeline none,sparse_dist --device cuda   # NCCL, streams\n")
    return p


def _check(args, parser) -> str:
    """The device, after the flags the pipeline benchmark can't honour are refused."""
    if args.world_size is None or args.world_size < 1:
        parser.error("--pipeline needs --world-size N (N >= 1)")
    if args.module != "ebc":
        parser.error("--module: the pipeline benchmark's model has a bag collection (ebc) only")
    for flag, value in (("--busy", args.busy), ("--plot", args.plot), ("--vbe-users", args.vbe_users),
                        ("--dtype", args.dtype and args.dtype != ["fp32"])):
        if value:
            parser.error(f"{flag}: not taken by the pipeline benchmark (fp32 tables, no VBE, no plot)")
    if args.mode not in (None, "train"):
        parser.error("--mode: the pipeline benchmark trains (--mode train)")
    if args.steps < 1 or args.timeout <= 0 or (args.repeats is not None and args.repeats < 1):
        parser.error("--steps and --repeats must be at least 1, --timeout positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.device_count() < args.world_size:
        parser.error(f"--world-size {args.world_size} on CUDA needs one GPU per rank; torch sees "
                     f"{torch.cuda.device_count()}")
    return device


def _workload(args, parser, device: str) -> Workload:
    """The default model's tables and batch (or the preset's first configuration), the flags applied."""
    w = (preset_workloads(args.preset, device)[0] if args.preset else DEFAULT).replace(device=device, mode="train")
    changes = {}
    for flag in ("tables", "num_embeddings", "batch_size", "pooling_factor"):
        value = getattr(args, flag)
        if value and len(value) > 1:
            parser.error(f"--{flag.replace('_', '-')}: the pipeline benchmark takes one value, not a sweep")
        if value:
            changes[flag] = value[0]
    for flag in ("bag_size", "distribution", "zipf_alpha", "weighted"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    if args.dim:
        changes["dims"] = tuple(int(float(d)) for part in args.dim for d in part.split(",") if d.strip())
    try:
        return w.replace(**changes)
    except ValueError as e:
        parser.error(str(e))
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_pipeline_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.list:
        print("pipelines (--pipeline): " + ", ".join(PIPELINES) + "\nlibraries (--providers): " + ", ".join(LIBRARIES))
        return 0
    device = _check(args, parser)
    w = _workload(args, parser, device)
    libraries = select_providers(args.providers, list(LIBRARIES), parser.error, baseline="")
    pipelines = ["none"] + [p for p in (args.pipeline or []) if p != "none"]
    delays = args.comm_delay_ms or [0.0]
    world = args.world_size
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    backend = "nccl" if device == "cuda" else "gloo"
    machine = machine_info(device)
    machine.update(torch_threads=threads, world_size=world, backend=backend)
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    print(f"jaggedrec-bench pipelines, {world} ranks over {backend} on {where}, {threads} torch thread"
          f"{'s' if threads > 1 else ''} per rank: torch {machine['torch']}, torchrec {machine['torchrec']}")
    from .pipeline_ranks import Job

    job = Job(workload=w, pipelines=pipelines, libraries=libraries, delays_ms=delays,
              rounds=args.repeats or (5 if device == "cpu" else 10), steps=args.steps, batches=max(1, args.batches),
              dense_in=args.dense_features, seed=args.seed, device=device, sharding=args.sharding or "table_wise",
              progress=not args.no_progress, undelayed=tuple(args.comm_undelayed))
    try:
        results = run_ranks(_rank_main, world, job, timeout=args.timeout, collective_timeout=min(300.0, args.timeout),
                            backend=backend, threads=threads)
    except RankFailure as e:
        print(f"jaggedrec-bench: {e}", file=sys.stderr)
        return 1
    result = results[0]
    doc = {"module": "pipeline", "command": ["jaggedrec-bench"] + argv, "machine": machine,
           "config": {**w.as_dict(), "dense_features": job.dense_in, "sharding": job.sharding, "world_size": world,
                      "global_batch": world * w.batch_size, "steps_per_turn": job.steps, "rounds": job.rounds,
                      "batch_bytes_per_rank": result["batch_bytes"], "delays_ms": delays, "pipelines": pipelines,
                      "undelayed": list(job.undelayed)},
           "rows": result["rows"], "skipped": result["skipped"]}
    print("\n" + format_table(doc))
    memory = "CUDA max_memory_allocated" if device == "cuda" else "RSS high-water mark, approximate"
    reference = next((r["first_output_vs"] for r in doc["rows"] if r["first_output_vs"]), "the none loop")
    print("\n" + LEGEND.format(memory=memory, reference=reference))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=1)
    if args.csv:
        write_csv(args.csv, doc)
    return 0


COLUMNS = ("provider", "delay ms", "median ms", "p20-p80 ms", "wait", "colls/step", "+delay ms", "hidden", "hidden p20",
           "step MB", "held", "held MB", "out err")


def format_table(doc: dict) -> str:
    c = doc["config"]
    rows = [list(COLUMNS)]
    for r in doc["rows"]:
        rows.append([r["provider"], f"{r['delay_ms']:g}", f"{r['median_ms']:.2f}",
                     f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}", _fmt(100 * r["wait_share"], ".0f", "%"),
                     _fmt(r["collectives_per_step"], ".1f"), _fmt(r["delay_cost_ms"], ".2f"),
                     _fmt(None if r["hidden"] is None else 100 * r["hidden"], ".0f", "%"),
                     _fmt(None if r["hidden_p20"] is None else 100 * r["hidden_p20"], ".0f", "%"),
                     _fmt(r["peak_mb"], ".1f"),
                     str(r["batches_held"]), _fmt(r["held_mb"], ".2f"), _fmt(r["first_output_err"], ".1e")])
    head = (f"{c['world_size']} ranks, --sharding {c['sharding']}, {c['tables']} tables x {c['num_embeddings']} rows, "
            f"dims {','.join(str(d) for d in c['dims'])}, {c['batch_size']} samples/rank, {c['dense_features']} dense "
            f"features, pooling {c['pooling_factor']:g}")
    if c.get("undelayed"):
        head += f"; not delayed: {', '.join(c['undelayed'])}"
    lines = [head] + aligned_rows(rows)
    lines += [f"  skipped {name}: {reason}" for name, reason in doc["skipped"].items()]
    lines += sorted({f"  plan {r['provider'].split('_')[0]}: {r['plan']}" for r in doc["rows"] if r["plan"]})
    return "\n".join(lines)


CSV_FIELDS = ("provider", "library", "pipeline", "delay_ms", "median_ms", "p20_ms", "p80_ms", "wait_share",
              "collectives_per_step", "delay_cost_ms", "hidden", "hidden_p20", "peak_mb", "batches_held", "held_mb",
              "first_output_err")


def write_csv(path: str, doc: dict) -> None:
    """One row per (provider, delay), with the run's configuration and machine columns."""
    c, m = doc["config"], doc["machine"]
    extra = {"world_size": c["world_size"], "sharding": c["sharding"], "tables": c["tables"],
             "num_embeddings": c["num_embeddings"], "batch_size": c["batch_size"], "device": m["device"],
             "torch_threads": m["torch_threads"], "cpu": m["cpu"], "gpu": m["gpu"], "date": m["date"]}
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(CSV_FIELDS) + list(extra))
        out.writeheader()
        for r in doc["rows"]:
            out.writerow({**{k: r[k] for k in CSV_FIELDS}, **extra})
        for name, reason in doc["skipped"].items():
            out.writerow({"provider": name, "library": name.split("_")[0], "pipeline": name.split("_", 1)[1],
                          **extra})


def _rank_main(rank: int, world: int, job) -> Optional[dict]:
    import torch.distributed as dist

    from .pipeline_ranks import run_on_rank

    device = torch.device(job.device, rank) if job.device == "cuda" else torch.device(job.device)
    env = RankEnv(world, rank, device, job.sharding, dist.group.WORLD)

    def say(message: str) -> None:
        if job.progress and rank == 0:
            print(f"[pipeline] {message}", file=sys.stderr, flush=True)

    return run_on_rank(job, env, say)
