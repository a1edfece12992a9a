"""``jaggedrec-bench --world-size N --sharding KIND``: the sharded benchmark.

It spawns N ranks (gloo on CPU; NCCL on CUDA, one GPU per rank), each with a global batch
of N x ``--batch-size`` bags per feature of which it feeds its own ``--batch-size``, and
reports per provider (``providers/sharded.py``): the median step time (the slowest rank's
per sample; alternating providers, rotating batches, as the single-process runner does), its
ratio to the unsharded jaggedrec module in one process on the global batch, the bytes each
rank sends per step, and the share of the step spent inside collectives (both counted at
``torch.distributed``, see ``sharded_comm.py``). Every provider's rows are first checked on
every rank against the unsharded reference (``sharded_ranks.py``).

The run is bounded: the ranks' collectives time out, and the whole run stops after
``--timeout`` seconds. Exit status: 0, 1 when a provider was wrong or a rank failed or ran
out of time, 2 on bad flags.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence

import torch

from jaggedrec.testing import RankFailure, run_ranks, send_to_parent

from .flags import build_parser, build_workloads, select_providers
from .presets import DEFAULT_PRESET
from .report import _fmt, aligned_rows, machine_info, spread_warnings, to_json, write_json
from .runner import Options, WorkloadResult
from .providers.sharded import BASELINE, RankEnv, sharded_providers

_EXAMPLES = """\
examples:
  jaggedrec-bench --world-size 2 --sharding table_wise                 # the dlrm preset, forward
  jaggedrec-bench --world-size 2 --sharding auto --mode train --num-embeddings 20k --batch-size 1024
  jaggedrec-bench --world-size 4 --sharding row_wise --device cuda     # NCCL, one GPU per rank

--batch-size is each rank's batch; the single-process baseline pools all ranks' batches at once.
"""

LEGEND = ("median ms: per sample, the slowest rank's step (every rank starts it after a barrier). vs 1proc: "
          f"{BASELINE}'s median (the unsharded module in one process, on rank 0, pooling the global batch) / this "
          "median. MB sent/rank: bytes a rank sends to the others per step, mean over ranks, counted from the "
          "tensors and splits of every torch.distributed collective the step calls (all-reduce as a ring's "
          "2(W-1)/W). wait: time inside those calls and their wait(), over the step time, mean over ranks.")


def build_sharded_parser():
    p = build_parser("ebc", sharded=True)
    p.prog = "jaggedrec-bench --world-size N"
    p.description = ("Time jaggedrec's sharded EmbeddingBagCollection and TorchRec's DistributedModelParallel "
                     "over N ranks against jaggedrec's unsharded module in one process on the global batch.")
    p.epilog = _EXAMPLES
    return p


def _check(args, parser) -> str:
    """The device, after the flag combinations the sharded benchmark can't run are refused."""
    if args.module != "ebc":
        parser.error(f"--module {args.module}: the sharded benchmark runs the bag collection (ebc) only")
    if args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    if args.mode == "backward":
        parser.error("--mode: the sharded benchmark times forward or train")
    if args.vbe_users:
        parser.error("--vbe-users: a sharded collection takes one batch size for all features (no VBE)")
    if args.csv or args.plot:
        parser.error("--csv and --plot are not written by the sharded benchmark; --output writes its JSON")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.device_count() < args.world_size:
        parser.error(f"--world-size {args.world_size} on CUDA needs one GPU per rank; torch sees "
                     f"{torch.cuda.device_count()}")
    return device


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_sharded_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    device = _check(args, parser)
    try:
        workloads = build_workloads(args, device)
    except ValueError as e:
        parser.error(str(e))
    names = [p.name for p in sharded_providers(RankEnv(1, 0, torch.device(device), args.sharding))]
    if args.list:
        print("\n".join(f"  {p.name:17s} {p.description}" for p in sharded_providers(RankEnv(1, 0, torch.device(device),
                                                                                       args.sharding))))
        return 0
    wanted = select_providers(args.providers, names, parser.error, BASELINE)
    world = args.world_size
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    options = Options(repeats=args.repeats or (30 if device == "cuda" else 10), batches=max(1, args.batches),
                      seed=args.seed)
    backend = "nccl" if device == "cuda" else "gloo"
    machine = machine_info(device)
    machine.update(torch_threads=threads, world_size=world, backend=backend)
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    print(f"jaggedrec-bench, {world} ranks over {backend} on {where}, {threads} torch threads per rank: "
          f"torch {machine['torch']}, torchrec {machine['torchrec']}")
    command = ["jaggedrec-bench"] + list(argv if argv is not None else sys.argv[1:])
    runs: List[WorkloadResult] = []

    def document():
        doc = to_json(runs, machine, None, args.preset or DEFAULT_PRESET, command, module="sharded")
        doc["sharding"] = {"world_size": world, "sharding": args.sharding, "backend": backend,
                           "threads_per_rank": threads, "global_batch": "world_size x config.batch_size"}
        return doc

    def on_result(run: WorkloadResult) -> None:
        runs.append(run)
        print("\n".join(["", format_table(run, world, args.sharding, backend), *spread_warnings(run)]), flush=True)
        if args.output:  # after every configuration, so a run cut short keeps what it measured
            write_json(args.output, document())

    job = (workloads, wanted, options, args.sharding, device, not args.no_progress)
    try:
        run_ranks(_rank_main, world, job, timeout=args.timeout, collective_timeout=min(300.0, args.timeout),
                  backend=backend, threads=threads, on_message=lambda rank, run: on_result(run))
    except RankFailure as e:
        print(f"jaggedrec-bench: {e}", file=sys.stderr)
        return 1
    print("\n" + LEGEND)
    wrong = sorted({n for run in runs for n, r in run.providers.items() if r.status == "wrong"})
    if wrong:
        print(f"WRONG results from: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


def format_table(run: WorkloadResult, world: int, sharding: str, backend: str) -> str:
    """One configuration's aligned table, then a line per provider not timed, per plan and per note."""
    w = run.workload
    head = ("provider", "status", "median ms", "p20-p80 ms", "vs 1proc", "MB sent/rank", "wait")
    rows = [list(head)]
    for name, r in run.providers.items():
        if r.status != "ok":
            rows.append([name, "WRONG" if r.status == "wrong" else "skipped"] + ["-"] * (len(head) - 2))
            continue
        mb = None if r.bytes_sent_per_rank is None else r.bytes_sent_per_rank / 1e6
        share = None if r.wait_share is None else 100 * r.wait_share
        rows.append([name, "ok", _fmt(r.median_ms, ".3f"), f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
                     _fmt(r.vs_1proc, ".2f", "x"), _fmt(mb, ".4g"), _fmt(share, ".0f", "%")])
    lines = [f"{world} ranks ({backend}), --sharding {sharding}, global batch {world} x {w.batch_size}: "
             f"{w.describe()}"] + aligned_rows(rows)
    for name, r in run.providers.items():
        if r.status != "ok":
            lines.append(f"  {'WRONG' if r.status == 'wrong' else 'skipped'} {name}: {r.reason}")
        if r.plan:
            lines.append(f"  plan {name}: {r.plan}")
        if r.note:
            lines.append(f"  note {name}: {r.note}")
    return "\n".join(lines)


# --- the ranks ---------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, job) -> None:
    """A spawned rank (``jaggedrec.testing.run_ranks``): run every workload, send rank 0's
    results to the parent as each is done."""
    import torch.distributed as dist

    from .sharded_comm import CollectiveCounter
    from .sharded_ranks import run_on_rank

    workloads, wanted, options, sharding, device, progress = job
    env = RankEnv(world, rank, torch.device(device, rank) if device == "cuda" else torch.device(device),
                  sharding, dist.group.WORLD)
    say = _progress(len(workloads)) if progress and rank == 0 else None
    with CollectiveCounter(cuda=device == "cuda") as counter:
        for i, w in enumerate(workloads):
            run = run_on_rank(w, wanted, options, env, counter,
                              (lambda msg, i=i: say(i, msg)) if say else (lambda msg: None))
            if rank == 0:
                send_to_parent(run)


def _progress(total: int) -> Callable[[int, str], None]:
    def say(index: int, message: str) -> None:
        print(f"[{index + 1}/{total}] {message}", file=sys.stderr, flush=True)
    return say
