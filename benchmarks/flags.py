"""The benchmark's flags: the parsers of ``jaggedrec-bench`` (the bag collection, or with
``--module ec`` the unpooled one), provider selection by name or prefix, and the workloads a
preset and the flags make (a comma list in a flag sweeps it). The sharded benchmark
(``sharded.py``) builds on the same parser."""

from __future__ import annotations

import argparse
import itertools
import re
from typing import Callable, List, Optional, Sequence

from .presets import DEFAULT_PRESET, PRESETS, preset_workloads
from .providers.sharded import SHARDINGS
from .runner import BASELINE
from .workload import DTYPES, MODES, OPTIMIZERS, QUANT_DTYPES, Workload

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
MODULES = ("ebc", "ec", "fpebc")
DEFAULT_EC_PRESET = "pooling"  # long id lists are what an unpooled lookup serves (sequence models)

# CLI flag -> Workload field, for the flags that override preset fields
_SWEEPABLE = {"tables": "tables", "num_embeddings": "num_embeddings", "batch_size": "batch_size",
              "pooling_factor": "pooling_factor", "dtype": "dtype", "busy": "busy"}
_SCALARS = ("bag_size", "distribution", "zipf_alpha", "weighted", "mode", "vbe_users", "optimizer")


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


def build_parser(module: str = "ebc", sharded: bool = False) -> argparse.ArgumentParser:
    """The flags of ``--module ebc`` (the bag collection, the default) or ``--module ec``; every
    flag the command takes is listed, the sharded benchmark's too (``sharded``: those required)."""
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
    shape.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="train mode's fused optimizer, by FBGEMM's EmbOptimType name: jaggedrec steps the "
                            "same one (fused_params), fbgemm_tbe uses that EmbOptimType (on CPU FBGEMM has only "
                            "exact_sgd, exact_rowwise_adagrad and exact_adagrad); providers that train with plain "
                            "SGD are skipped for the others (default exact_sgd)")
    run = p.add_argument_group("run")
    run.add_argument("--module", choices=MODULES, default="ebc",
                     help="ebc: the EmbeddingBagCollection (default); ec: the unpooled EmbeddingCollection, one row "
                          "per id, with flags and defaults of its own (--module ec --help); fpebc: position-weighted "
                          "features (FeatureProcessedEmbeddingBagCollection) beside the unweighted and weighted "
                          "collections and TorchRec's FPEBC, on the bag collection's flags")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    run.add_argument("--providers", help="comma list of names or prefixes, e.g. jaggedrec,fbgemm (default: all; "
                                         "those that can't run here say why)")
    run.add_argument("--threads", type=int,
                     help="torch CPU threads per rank (default: the cores over the ranks)" if sharded else
                     "torch CPU threads (default on CPU: 1, whose times hold on a busy or shared machine, where a "
                     "parallel region waits for a thread that another process holds off its core; 0: torch's "
                     "default, one per core)")
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
    ranks = p.add_argument_group("sharding (over N processes; --world-size 2 --sharding auto --help for details)")
    ranks.add_argument("--world-size", type=int, required=sharded,
                       help="spawn this many ranks (gloo on CPU; NCCL on CUDA, one GPU each) and time the sharded "
                            "collection against the unsharded one on the global batch; needs --sharding")
    ranks.add_argument("--sharding", choices=SHARDINGS, required=sharded,
                       help="every table table_wise (table i on rank i %% N), row_wise, column_wise (N column "
                            "blocks) or data_parallel; auto: each library's planner")
    ranks.add_argument("--timeout", type=float, default=900.0,
                       help="seconds for the whole sharded run, after which every rank is stopped (default 900)")
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
