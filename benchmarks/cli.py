"""``jaggedrec-bench``: jaggedrec against nn.EmbeddingBag, TorchRec and FBGEMM on the same inputs.

Run ``jaggedrec-bench --help`` for the flags and ``jaggedrec-bench --list`` for the presets
and providers. The exit status is 1 when some provider's output was wrong, 2 on bad flags.

``jaggedrec-bench --module ec`` runs the same benchmark for the unpooled EmbeddingCollection
(one row per id): the same presets and flags, the ``nn.Embedding`` loop as the baseline, and
by default every mode (``--mode`` takes a comma list there).

``jaggedrec-bench --module fpebc`` times position-weighted features: jaggedrec's and TorchRec's
``FeatureProcessedEmbeddingBagCollection`` beside the unweighted and the weighted collection
(``providers/fp.py``), on the bag collection's presets and flags.

``jaggedrec-bench --dtype int8`` (or ``int4``, or ``int8,int4``) times quantized inference,
forward mode only: jaggedrec.quant, TorchRec's quantized collection and torch's quantized ops
against the fp32 jaggedrec module they are built from (``providers/quant.py``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from jaggedrec.ops.host_memory import retain_freed_memory

from .flags import DEFAULT_EC_PRESET, MODULES, build_parser, build_workloads, select_providers
from .pipeline import add_pipeline_flags
from .presets import DEFAULT_PRESET, PRESETS
from .providers import Provider, all_providers, ec_providers, quant_providers
from .providers.quant import PEER_FACTOR
from .report import (format_table, machine_info, skipped_summary, spread_warnings, to_json, write_csv, write_json,
                     write_plot)
from .runner import POOLED, QUANT, UNPOOLED, Module, Options, WorkloadResult, quiet, run_workload
from .timing import copy_bandwidth_gbps
from .workload import MODES, QUANT_DTYPES, Workload

class _Progress:
    """A tqdm bar over configurations when tqdm is installed, else one stderr line per phase."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.index, self.bar = total, enabled, 0, None
        if enabled and sys.stderr.isatty():  # in a log file, plain lines read better than a redrawn bar
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="config", file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                print("(tqdm is not installed: progress comes as plain lines)", file=sys.stderr)

    def phase(self, message: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(message)
        elif self.enabled:
            print(f"[{self.index + 1}/{self.total}] {message}", file=sys.stderr, flush=True)

    def done_one(self) -> None:
        self.index += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _listing(providers: Callable[[], List[Provider]] = all_providers) -> str:
    lines = ["presets:"] + [f"  {name:11s} {p.description}" for name, p in PRESETS.items()]
    lines += ["providers:"] + [f"  {p.name:17s} {p.description}" for p in providers()]
    return "\n".join(lines)


LEGEND = ("GB/s: (table rows gathered + fp32 output) bytes per step / median time, FBGEMM's convention "
          "(backward counts both twice; train 3x rows, 2x output). % copy BW: of the tensor-copy bandwidth "
          "measured in this run. vs loop: eb_loop's median / this median. peak MB: parameters, buffers and "
          "optimizer state plus the extra memory at the peak of one step ({memory}). table MB: parameters and "
          "buffers.")
QUANT_LEGEND = ("GB/s: (table rows gathered, at the quantized rows' bytes with row_align 1 + fp32 output) bytes "
                "per step / median time, for every provider, fp32 included. % copy BW: of the tensor-copy "
                "bandwidth measured in this run. vs fp32: jaggedrec_fp32's median / this median. table MB: "
                "parameters and buffers, the tables as each provider stores them. peak MB: those plus the extra "
                "memory at the peak of one step ({memory}). Outputs checked against jaggedrec_fp32's within the "
                "rounding bound (per element, the sum over its bag's ids of |weight| x the row's half step), "
                f"the peers (their own rounding) within {PEER_FACTOR:g}x it.")
EC_LEGEND = ("GB/s: (table rows gathered + rows written out, both in the table dtype) bytes per step / median "
             "time (backward counts both twice; train 3x rows, 2x output: FBGEMM's convention, the output being "
             "one row per id). % copy BW: of the tensor-copy bandwidth measured in this run. vs loop: "
             "embedding_loop's median / this median. peak MB: parameters, buffers and optimizer state plus the "
             "extra memory at the peak of one step ({memory}). table MB: parameters and buffers.")


def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The last value ``argv`` gives ``flag`` (``--flag V`` or ``--flag=V``); None when absent.
    It picks the parser before parsing: each module has flags of its own."""
    value = None
    for at, arg in enumerate(argv):
        if arg == flag:
            value = argv[at + 1] if at + 1 < len(argv) else ""
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (0: left as they are) for the run, then restored,
    so that a caller in the same process (a test) keeps its own."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Optional[Sequence[str]] = None,
         provider_factory: Optional[Callable[[], List[Provider]]] = None) -> int:
    """Run the CLI. ``provider_factory`` makes fresh providers per configuration (tests inject one;
    by default the module's own: every pooled provider, or with ``--module ec`` the unpooled ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _flag_value(argv, "--pipeline") is not None:
        return _pipeline(argv)
    if _flag_value(argv, "--world-size") is not None or _flag_value(argv, "--sharding") is not None:
        return _sharded(argv)
    module_name = _flag_value(argv, "--module") or "ebc"
    if module_name == "mc":  # hash tables on raw ids: flags and report of their own
        from .providers.mc import main as mc_main

        return mc_main(argv)
    if module_name not in MODULES:
        print(f"jaggedrec-bench: --module must be one of {', '.join(MODULES)}, got {module_name!r}", file=sys.stderr)
        return 2
    parser = build_parser(module_name)
    add_pipeline_flags(parser)  # listed by --help; a run with --pipeline goes to pipeline.main
    args = parser.parse_args(argv)
    if args.pipeline is not None:  # an abbreviation: --pipe none
        return _pipeline(argv)
    if args.world_size is not None or args.sharding is not None:  # an abbreviation: --world 2
        return _sharded(argv)
    if args.module != module_name:  # an abbreviation: --modu ec
        parser = build_parser(args.module)
        args = parser.parse_args(argv)
    unpooled = args.module == "ec"
    quantized = bool(args.dtype) and args.dtype[0] in QUANT_DTYPES
    if quantized and unpooled:
        parser.error(f"--dtype {','.join(args.dtype)}: jaggedrec.quant has a bag collection only (no --module ec)")
    if quantized and args.mode not in (None, "forward"):
        parser.error(f"--dtype {','.join(args.dtype)} with --mode {args.mode}: quantized tables are for inference "
                     f"only; use --mode forward")
    module = UNPOOLED if unpooled else QUANT if quantized else POOLED
    if provider_factory is None and args.module == "fpebc":
        if quantized:
            parser.error("--module fpebc: float tables only")
        from .providers.fp import fp_providers  # position-weighted features (FPEBC)

        provider_factory = fp_providers
    provider_factory = provider_factory or (ec_providers if unpooled else quant_providers if quantized
                                            else all_providers)
    if args.list:
        print(_listing(provider_factory))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    modes: List[Optional[str]] = [None]
    if unpooled:
        if args.weighted:
            parser.error("--weighted: an unpooled lookup has no per-id weights to apply")
        modes, args.mode = args.mode or list(MODES), None
    try:
        workloads = build_workloads(args, device, DEFAULT_EC_PRESET if unpooled else DEFAULT_PRESET)
        if unpooled:  # each configuration in every mode, one after the other: the same ids each time
            workloads = [w.replace(mode=m) for w in workloads for m in modes]
            if any(w.vbe_users for w in workloads):
                parser.error("--vbe-users / --preset vbe: jaggedrec's EmbeddingCollection refuses a VBE KJT")
    except ValueError as e:
        parser.error(str(e))
    wanted = select_providers(args.providers, [p.name for p in provider_factory()], parser.error, module.baseline)
    options = Options(repeats=args.repeats or (30 if device == "cuda" else 10), batches=max(1, args.batches),
                      seed=args.seed)
    if args.threads is not None and args.threads < 0:
        parser.error(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    threads = args.threads if args.threads is not None else 1 if device == "cpu" else 0
    with _torch_threads(threads):
        return _run(args, argv, device, workloads, wanted, options, module, provider_factory)


def _sharded(argv: List[str]) -> int:
    from .sharded import main as sharded_main  # over N ranks

    return sharded_main(argv)


def _pipeline(argv: List[str]) -> int:
    from .pipeline import main as pipeline_main  # train pipelines over N ranks

    return pipeline_main(argv)


def _run(args, argv: List[str], device: str, workloads: List[Workload], wanted: List[str], options: Options,
         module: Module, provider_factory: Callable[[], List[Provider]]) -> int:
    """Time every configuration, print and write the results; the exit status."""
    unpooled, quantized = module is UNPOOLED, module is QUANT
    # jaggedrec's CPU module sets this process-wide when built; set it before any timing, so
    # that every provider, the copy bandwidth included, runs under the same allocator
    retained = device == "cpu" and retain_freed_memory()
    machine = machine_info(device)
    machine["malloc_retains_freed_memory"] = retained
    with quiet():
        copy_gbps = copy_bandwidth_gbps(device, 256 if device == "cuda" else 128)
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    threads = machine["torch_threads"]
    on_cpu = f", {threads} torch thread{'s' if threads > 1 else ''} (--threads)" if device == "cpu" else ""
    print(f"jaggedrec-bench on {where}: torch {machine['torch']}, triton {machine['triton']}{on_cpu}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    preset = args.preset or (DEFAULT_EC_PRESET if unpooled else DEFAULT_PRESET)
    command = ["jaggedrec-bench"] + list(argv)
    progress = _Progress(len(workloads), enabled=not args.no_progress)
    document_module = "ec" if unpooled else None  # the pooled documents keep their layout
    runs: List[WorkloadResult] = []
    try:
        for w in workloads:
            providers = [p for p in provider_factory() if p.name in wanted]
            run = run_workload(w, providers, options, copy_gbps, progress.phase, module)
            runs.append(run)
            progress.write("\n" + format_table(run, f"EmbeddingCollection: {w.describe()}" if unpooled else "",
                                                "vs fp32" if quantized else "vs loop"))
            for line in spread_warnings(run):
                progress.write(line)
            progress.done_one()
            if args.output:  # after every configuration, so a run cut short keeps what it measured
                write_json(args.output, to_json(runs, machine, copy_gbps, preset, command, module=document_module))
    finally:
        progress.close()
    summary = skipped_summary(runs)
    if summary:
        print("\n" + summary)
    memory = "CUDA max_memory_allocated" if device == "cuda" else "RSS-based on CPU, approximate"
    print("\n" + (EC_LEGEND if unpooled else QUANT_LEGEND if quantized else LEGEND).format(memory=memory))
    document = to_json(runs, machine, copy_gbps, preset, command, module=document_module)
    if args.csv:
        write_csv(args.csv, document)
    if args.plot:
        why_not = write_plot(args.plot, runs, f"{preset}: {runs[0].workload.describe()}"
                             if len(runs) == 1 else f"{preset} sweep, {where}")
        if why_not:
            print(f"--plot: {why_not}", file=sys.stderr)
    wrong = sorted({n for run in runs for n, r in run.providers.items() if r.status == "wrong"})
    if wrong:
        print(f"WRONG results from: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0
