"""``jaggedrec-bench``: jaggedrec against nn.EmbeddingBag, TorchRec and FBGEMM on the same inputs.

Run ``jaggedrec-bench --help`` for the flags and ``jaggedrec-bench --list`` for the presets
and providers. The exit status is 1 when some provider's output was wrong, 2 on bad flags.

``jaggedrec-bench --module ec`` runs the same benchmark for the unpooled EmbeddingCollection
(one row per id): the same presets and flags, the ``nn.Embedding`` loop as the baseline, and
by default every mode (``--mode`` takes a comma list there).

``jaggedrec-bench --dtype int8`` (or ``int4``, or ``int8,int4``) times quantized inference,
forward mode only: jaggedrec.quant, TorchRec's quantized collection and torch's quantized ops
against the fp32 jaggedrec module they are built from (``quant_providers.py``).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from typing import Callable, List, Optional, Sequence

import torch

from jaggedrec.ops.host_memory import retain_freed_memory

from .presets import DEFAULT_PRESET, PRESETS, preset_workloads
from .providers import Provider, all_providers, ec_providers
from .quant_providers import PEER_FACTOR, QUANT, quant_providers
from .report import format_table, machine_info, skipped_summary, to_json, write_csv, write_json, write_plot
from .runner import BASELINE, POOLED, UNPOOLED, Options, WorkloadResult, quiet, run_workload
from .timing import copy_bandwidth_gbps
from .workload import DTYPES, MODES, QUANT_DTYPES, Workload

_EXAMPLES = """\
examples:
  jaggedrec-bench                                   # the default preset (dlrm), sized for this device
  jaggedrec-bench --preset scaling --plot scaling.png --output scaling.json
  jaggedrec-bench --tables 8 --num-embeddings 1M --dim 128 --batch-size 2048 --pooling-factor 20,50
  jaggedrec-bench --preset dlrm --mode train --providers eb_loop,jaggedrec[torch],fbgemm_tbe
  jaggedrec-bench --preset pooling --dtype int8,int4 # quantized tables against the fp32 module
  jaggedrec-bench --mode train --pooling-factor 20 --busy 0,1  # quiet, then beside a busy process

A comma list in --tables, --num-embeddings, --batch-size, --pooling-factor, --dtype or --busy sweeps over it.
"""

_EC_EXAMPLES = """\
examples:
  jaggedrec-bench --module ec                       # the pooling preset's tables, forward, backward and train
  jaggedrec-bench --module ec --preset mixed-dims --mode forward,train
  jaggedrec-bench --module ec --pooling-factor 20 --providers embedding_loop,jaggedrec,torchrec

The presets are the bag collection's (--list); --pooling-factor is then the mean ids per
feature of a sample (a sequence's length). A comma list in --mode, --tables, --num-embeddings,
--batch-size or --pooling-factor sweeps over it.
"""
DEFAULT_EC_PRESET = "pooling"  # long id lists are what an unpooled lookup serves (sequence models)

# CLI flag -> Workload field, for the flags that override preset fields
_SWEEPABLE = {"tables": "tables", "num_embeddings": "num_embeddings", "batch_size": "batch_size",
              "pooling_factor": "pooling_factor", "dtype": "dtype", "busy": "busy"}
_SCALARS = ("bag_size", "distribution", "zipf_alpha", "weighted", "mode", "vbe_users")


def _number(text: str) -> float:
    """``"100000"``, ``"100_000"``, ``"100k"``, ``"1M"``, ``"1e6"`` -> a number."""
    match = re.fullmatch(r"\s*([0-9_.eE+-]+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    try:
        return float(match.group(1).replace("_", "")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _list_of(cast: Callable[[float], object]) -> Callable[[str], List[object]]:
    def parse(text: str) -> List[object]:
        values = [cast(_number(part)) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"no values in {text!r}")
        return values
    return parse


def build_parser(module: str = "ebc") -> argparse.ArgumentParser:
    """The flags of ``--module ebc`` (the bag collection, the default) or ``--module ec``."""
    if module == "ec":
        p = argparse.ArgumentParser(prog="jaggedrec-bench --module ec", epilog=_EC_EXAMPLES,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    description="Time jaggedrec's EmbeddingCollection (one row per id) against a "
                                                "loop of nn.Embedding and the other peers, on the same inputs.")
    else:
        p = argparse.ArgumentParser(prog="jaggedrec-bench", epilog=_EXAMPLES,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    description="Time jaggedrec's EmbeddingBagCollection against a loop of "
                                                "nn.EmbeddingBag and the other peers, on the same inputs.")
    default_preset = DEFAULT_EC_PRESET if module == "ec" else DEFAULT_PRESET
    shape = p.add_argument_group("workload (each overrides the preset)")
    shape.add_argument("--preset", choices=list(PRESETS), help=f"named workload (default: {default_preset})")
    shape.add_argument("--tables", type=_list_of(int), help="number of tables (one feature each)")
    shape.add_argument("--num-embeddings", type=_list_of(int), help="rows per table, e.g. 100k or 1M")
    shape.add_argument("--dim", nargs="+", help="embedding dim, or one dim per table cycled: --dim 4,16,64")
    shape.add_argument("--batch-size", type=_list_of(int), help="samples per batch")
    shape.add_argument("--pooling-factor", type=_list_of(float), help="mean ids per bag")
    shape.add_argument("--bag-size", choices=("fixed", "random"),
                       help="fixed: every bag has the pooling factor's ids; random: uniform in [0, 2x], some empty")
    shape.add_argument("--distribution", choices=("uniform", "zipf"), help="how ids are drawn")
    shape.add_argument("--zipf-alpha", type=float, help="zipf exponent (default 1.1)")
    shape.add_argument("--dtype", type=_dtypes,
                       help=f"table dtype (outputs are fp32): {', '.join(DTYPES)}, or quantized "
                            f"{', '.join(QUANT_DTYPES)} (forward mode: jaggedrec.quant and its peers against "
                            f"the fp32 module); a comma list of one kind sweeps")
    shape.add_argument("--weighted", action="store_true", default=None, help="per-id weights")
    shape.add_argument("--vbe-users", type=int,
                       help="f0 is a user feature: the batch's samples come from this many users, and "
                            "jaggedrec_vbe pools each user's bag once (variable batch per feature)")
    if module == "ec":
        shape.add_argument("--mode", type=_modes, help="forward (inference), backward (fwd+bwd), train (+SGD step), "
                                                       "or a comma list of them (default: all three)")
    else:
        shape.add_argument("--mode", choices=MODES, help="forward (inference), backward (fwd+bwd), train (+SGD step)")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    run.add_argument("--providers", help="comma list of names or prefixes, e.g. jaggedrec,fbgemm (default: all; "
                                         "those that can't run here say why)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    run.add_argument("--busy", type=_list_of(int),
                     help="time each provider beside this many busy processes, each keeping a core busy "
                          "(contention from other work on the machine); --busy 0,1 measures both")
    run.add_argument("--repeats", type=int, help="timed samples per provider (default 10 on CPU, 30 on CUDA)")
    run.add_argument("--batches", type=int, default=3, help="distinct input batches to rotate over (default 3)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--list", action="store_true", help="list presets and providers, then exit")
    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="FILE.json", help="write every result and the machine as JSON")
    out.add_argument("--csv", metavar="FILE", help="one row per (config, provider); appends to a matching file")
    out.add_argument("--plot", metavar="FILE.png", help="plot ms and GB/s per provider (needs matplotlib)")
    return p


def _modes(text: str) -> List[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return list(dict.fromkeys(modes))


def _dtypes(text: str) -> List[str]:
    """``"int8,int4"`` -> ``["int8", "int4"]``: all float dtypes or all quantized ones (the two
    have different providers and baselines)."""
    dtypes = list(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
    bad = [d for d in dtypes if d not in DTYPES and d not in QUANT_DTYPES]
    if bad or not dtypes:
        raise argparse.ArgumentTypeError(f"dtypes are {', '.join([*DTYPES, *QUANT_DTYPES])}; got {text!r}")
    if len({d in QUANT_DTYPES for d in dtypes}) > 1:
        raise argparse.ArgumentTypeError(f"{text!r} mixes float and quantized dtypes: run them separately")
    return dtypes


def _canonical(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())  # "jaggedrec[torch]" == "jaggedrec-torch"


def select_providers(spec: Optional[str], names: Sequence[str], error: Callable[[str], None],
                     baseline: str = BASELINE) -> List[str]:
    """The names ``spec`` picks from ``names`` (all when empty), in ``names``' order, baseline included."""
    if not spec:
        return list(names)
    chosen = []
    for part in filter(None, spec.replace(" ", ",").split(",")):
        exact = [n for n in names if _canonical(n) == _canonical(part)]
        # a prefix picks every provider it starts: "fbgemm", or "jaggedrec" for all its backends
        matches = exact or [n for n in names if _canonical(n).startswith(_canonical(part))]
        if not matches:
            error(f"unknown provider {part!r}; choose from {', '.join(names)}")
        chosen += [m for m in matches if m not in chosen]
    if baseline not in chosen:
        chosen.insert(0, baseline)  # the reference every output is checked against
    return [n for n in names if n in chosen]


def build_workloads(args: argparse.Namespace, device: str, default_preset: str = DEFAULT_PRESET) -> List[Workload]:
    """The preset's configurations with the flags applied; a comma list in a flag sweeps it."""
    base = preset_workloads(args.preset or default_preset, device)
    common = {f: getattr(args, f) for f in _SCALARS if getattr(args, f) is not None}
    if args.dim:
        common["dims"] = tuple(int(_number(d)) for part in args.dim for d in part.split(",") if d.strip())
    sweeps = {field: getattr(args, flag) for flag, field in _SWEEPABLE.items() if getattr(args, flag)}
    workloads: List[Workload] = []
    for w in base:
        for combo in itertools.product(*sweeps.values()):
            candidate = w.replace(**common, **dict(zip(sweeps, combo)))
            if candidate not in workloads:
                workloads.append(candidate)
    return workloads


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


def _pop_module(argv: List[str]) -> Optional[str]:
    """Take ``--module NAME`` (or ``--module=NAME``) out of ``argv``; "ebc" when absent."""
    for at, arg in enumerate(argv):
        if arg == "--module":
            module = argv[at + 1] if at + 1 < len(argv) else ""
            del argv[at:at + 2]
            return module
        if arg.startswith("--module="):
            del argv[at]
            return arg.split("=", 1)[1]
    return "ebc"


def main(argv: Optional[Sequence[str]] = None,
         provider_factory: Optional[Callable[[], List[Provider]]] = None) -> int:
    """Run the CLI. ``provider_factory`` makes fresh providers per configuration (tests inject one;
    by default the module's own: every pooled provider, or with ``--module ec`` the unpooled ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=")[0] in ("--world-size", "--sharding") for a in argv):  # over N ranks: sharded.py
        from .sharded import main as sharded_main

        return sharded_main(argv)
    # taken out before parsing, so that the bag collection's flags and help stay as they were
    module_name = _pop_module(argv)
    if module_name not in ("ebc", "ec"):
        print(f"jaggedrec-bench: --module must be ebc or ec, got {module_name!r}", file=sys.stderr)
        return 2
    unpooled = module_name == "ec"
    parser = build_parser(module_name)
    args = parser.parse_args(argv)
    quantized = bool(args.dtype) and args.dtype[0] in QUANT_DTYPES
    if quantized and unpooled:
        parser.error(f"--dtype {','.join(args.dtype)}: jaggedrec.quant has a bag collection only (no --module ec)")
    if quantized and args.mode not in (None, "forward"):
        parser.error(f"--dtype {','.join(args.dtype)} with --mode {args.mode}: quantized tables are for inference "
                     f"only; use --mode forward")
    module = UNPOOLED if unpooled else QUANT if quantized else POOLED
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
    if args.threads:
        torch.set_num_threads(args.threads)
    # jaggedrec's CPU module sets this process-wide when built; set it before any timing, so
    # that every provider, the copy bandwidth included, runs under the same allocator
    retained = device == "cpu" and retain_freed_memory()
    machine = machine_info(device)
    machine["malloc_retains_freed_memory"] = retained
    with quiet():
        copy_gbps = copy_bandwidth_gbps(device, 256 if device == "cuda" else 128)
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    print(f"jaggedrec-bench on {where}: torch {machine['torch']}, triton {machine['triton']}; "
          f"copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    preset = args.preset or (DEFAULT_EC_PRESET if unpooled else DEFAULT_PRESET)
    command = ["jaggedrec-bench"] + (["--module", "ec"] if unpooled else []) + list(argv)
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
