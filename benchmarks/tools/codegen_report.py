"""What the kernels' machine code says about their speed, read without a GPU.

    python benchmarks/tools/codegen_report.py                      # dlrm: fp32, dim 128, int64 ids
    python benchmarks/tools/codegen_report.py --dtype fp16 --dim 64 --ids int32 --json out.json

Compiles every kernel variant the library launches for one workload to sm_90a (each autotune
config, each switch the workload can set), disassembles it with the ``cuobjdump`` in Triton's
bundle, and prints per variant: registers, local memory (spills), shared memory, theoretical
H100 occupancy, the width of the row loads, the serial DRAM round trips per iteration of the
gather or run loop (from the scoreboard bits, see ``sass``), and the row loads in flight at the
peak, per thread and per multiprocessor. With ``--estimate`` it also turns the whole program's
round trips into a bandwidth estimate by Little's law (see :func:`estimate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("JAGGEDREC_AUTOTUNE", "1")  # the tuned configs, whatever the caller's setting
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sass  # noqa: E402  (beside this script)

# Hopper's per-multiprocessor limits (the same on H100 and H200)
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
MULTIPROCESSORS = 132


@dataclasses.dataclass
class Variant:
    kernel: str  # a short name: fwd, rows_grad, long_runs, fused, rows_grad_atomic, psw_grad
    label: str  # the switches and config that make it
    fn: object  # the jit function
    types: Dict[str, str]  # argument name -> triton type ("*fp32", "i32")
    constexprs: Dict[str, object]
    num_warps: int
    loop: Optional[str] = None  # what its innermost loop does, when the bound applies to it
    row_bytes: int = 4  # bytes per element of the rows the loop gathers

    def row_loads_per_step(self, load_bytes: int) -> int:
        """Row-load instructions per thread in one iteration of the source loop: its tile of
        ``rows x BLOCK_D`` elements over the program's threads, ``load_bytes`` at a time."""
        c = self.constexprs
        rows = c.get("BLOCK_B", c.get("BLOCK_U", c.get("BLOCK_Q", 1))) * c.get("UNROLL", 1)
        return max(1, rows * c["BLOCK_D"] * self.row_bytes // (32 * self.num_warps * max(load_bytes, 1)))


def compile_kernel(kernel, types: Dict[str, str], constexprs: Dict[str, object], num_warps: int, arch: int = 90):
    """``triton.compile`` of ``kernel`` (jit or autotuned) for sm_``arch``, no GPU needed: argument
    ``types`` by name (the rest constexprs), pointers 16-byte aligned, as torch allocates them."""
    fn = getattr(kernel, "fn", kernel)
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    consts = {(fn.arg_names.index(n),): value for n, value in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_variant(v: Variant):
    return compile_kernel(v.fn, v.types, v.constexprs, v.num_warps)


def cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def resources(cubin: bytes) -> Dict[str, int]:
    """Registers, local memory and static shared memory per thread/block, from ``cuobjdump -res-usage``."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", text.split("Function", 1)[-1]))
    return {"registers": int(fields.get("REG", 0)), "local": int(fields.get("LOCAL", 0)),
            "shared": int(fields.get("SHARED", 0))}


def occupancy(registers: int, shared: int, num_warps: int) -> Dict[str, float]:
    """Resident blocks and warps per multiprocessor: registers go out 256 per warp at a time,
    and a block holds its shared memory plus 1 KB the hardware reserves."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = SHARED_PER_SM // (shared + 1024)
    blocks = max(0, min(MAX_BLOCKS_PER_SM, by_registers, by_warps, by_shared))
    return {"blocks": blocks, "warps": blocks * num_warps, "occupancy": blocks * num_warps / MAX_WARPS_PER_SM}


@dataclasses.dataclass
class Reading:
    """What one variant's machine code says."""
    kernel: str
    label: str
    num_warps: int
    registers: int
    local_bytes: int
    shared_bytes: int
    blocks_per_sm: int
    occupancy: float
    row_load_bytes: int  # the widest row load, per thread (16: a 16-byte vector)
    round_trips: float  # the worst innermost loop's serial DRAM round trips per source iteration
    steps_per_iteration: int  # source iterations per machine-code iteration (the compiler's unrolling)
    row_loads_per_iteration: int  # per machine-code iteration
    peak_row_loads: int  # per thread
    peak_kb_per_sm: float
    unwaited: List[str]  # the decoder check (empty when every load's result is waited for)
    loop: Optional[str] = None
    prologue_round_trips: int = 0  # before the first gather/run loop
    constexprs: Dict[str, object] = dataclasses.field(default_factory=dict)
    row_bytes: int = 4  # bytes per element of the gathered rows

    @property
    def bound_applies(self) -> bool:
        return self.loop is not None


def read(v: Variant) -> Reading:
    compiled = compile_variant(v)
    cubin = compiled.asm["cubin"]
    code = next(iter(sass.parse(sass.disassemble(cubin, cuobjdump())).values()))
    res = resources(cubin)
    occ = occupancy(res["registers"], max(res["shared"], int(getattr(compiled.metadata, "shared", 0) or 0)),
                    v.num_warps)
    timings = [sass.simulate(code, s, e) for s, e in sass.innermost_loops(code)]
    # the compiler may unroll a loop further (LLVM did, 4 times, for 1-vector-per-thread tiles):
    # its machine iteration then holds several source iterations, each with its own row loads
    steps = [max(1, round(t.data_loads / v.row_loads_per_step(t.load_bytes))) for t in timings]
    per_step = [t.round_trips / n for t, n in zip(timings, steps)]
    worst = max(range(len(timings)), key=lambda i: (per_step[i], -timings[i].peak_in_flight), default=None)
    peak = max((t.peak_in_flight for t in timings), default=0)
    width = max((t.load_bytes for t in timings), default=0)
    return Reading(
        v.kernel, v.label, v.num_warps, res["registers"], res["local"], max(res["shared"], 0),
        occ["blocks"], occ["occupancy"], width, round(per_step[worst], 2) if timings else 0,
        steps[worst] if timings else 0, timings[worst].data_loads if timings else 0, peak,
        peak * width * 32 * occ["warps"] / 1024, sass.unwaited_reads(code),
        v.loop, sass.prologue_round_trips(code, min(s for s, _ in sass.innermost_loops(code))) if timings else 0,
        dict(v.constexprs), v.row_bytes)


# ----------------------------------------------------------------------------- the variants

def argument_types(dtype: str = "fp32", ids: str = "int64"):
    """The kernels' argument types for ``dtype`` tables and ``ids`` ids: (forward, run-tile kernels,
    fused step, long-run sums, contribution kernels, table pointer type)."""
    table, index = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}[dtype], {"int64": "*i64", "int32": "*i32"}[ids]
    f32, i64 = "*fp32", "*i64"
    fwd = {"weights_ptr": table, "values_ptr": index, "offsets_ptr": index, "psw_ptr": f32, "inverse_ptr": i64,
           "meta_ptr": i64, "out_ptr": f32, "bad_ids_ptr": i64, "batch_size": "i32", "bag_stride": "i32",
           "out_stride": "i32", "num_features": "i32"}
    runs = {n: i64 for n in ["num_runs_ptr", "run_start_ptr", "run_row_ptr", "run_feature_ptr", "item_offset_ptr",
                             "long_rank_ptr", "meta_ptr"]}
    runs.update(grad_out_ptr=f32, item_scale_ptr=f32, long_sums_ptr=f32)
    fused = dict(runs, weights_ptr=table, state1_ptr=f32, state2_ptr=f32, hparams_ptr=f32, step_ptr=i64)
    long_runs = dict(grad_out_ptr=f32, num_long_ptr=i64, long_runs_ptr=i64, run_start_ptr=i64, run_feature_ptr=i64,
                     item_offset_ptr=i64, item_scale_ptr=f32, meta_ptr=i64, long_sums_ptr=f32)
    contrib = dict(grad_out_ptr=f32, grad_stride="i32", rows_ptr=i64, contrib_feature_ptr="*i32",
                   bag_of_value_ptr=i64, offsets_ptr=index, meta_ptr=i64, num_contributions="i32",
                   num_values="i32", batch_size="i32", max_dim="i32")
    return fwd, runs, fused, long_runs, contrib, table


def _alignment(dim: int) -> int:
    # as the op plans it for one table (or several of the same dim): the largest power of two
    # up to 16 dividing the dim (the tables' offsets are multiples of their dims)
    alignment = 16
    while dim % alignment:
        alignment //= 2
    return alignment


def workload_variants(dtype: str = "fp32", dim: int = 128, ids: str = "int64", weighted: bool = False,
                      legacy: Optional[bool] = None) -> List[Variant]:
    """Every variant the library launches for tables of ``dtype`` and ``dim`` with ``ids``
    ids: the forward, the deterministic backward (dense and
    compact gradients, and the long runs' sums), the fused step for each optimizer, and the
    atomic backward; each at every autotune config. ``legacy`` sets LEGACY_LOOPS (None: the
    kernels' default, False)."""
    from jaggedrec.kernels import pooled_bwd, pooled_fused, pooled_fwd, row_runs, sequence_fwd
    from jaggedrec.kernels.common import block_d

    fwd, runs, fused, long_runs, contrib, table = argument_types(dtype, ids)
    dims = dict(BLOCK_D=block_d(dim), DIM_ALIGN=_alignment(dim))
    switch = {"LEGACY_LOOPS": bool(legacy)}
    out: List[Variant] = []

    def add(kernel, fn, types, constexprs, loop=None, row_bytes=4):
        params = {p.name for p in fn.fn.params if p.is_constexpr}
        for config in fn.configs:
            full = {k: v for k, v in dict(dims, ROW_STRIDE=dim, ONE_TILE=dim <= dims["BLOCK_D"], **switch,
                                          **constexprs).items() if k in params}
            full.update(config.kwargs)
            label = " ".join([f"{k}={v}" for k, v in constexprs.items()]
                             + [f"{k}={v}" for k, v in config.kwargs.items()] + [f"warps={config.num_warps}"])
            out.append(Variant(kernel, label, fn, types, full, config.num_warps, loop, row_bytes))

    for inverse in (False, True):  # True: VBE, each output row reads its bag through the inverse index
        add("fwd", pooled_fwd._pooled_fwd_kernel, fwd, dict(HAS_PSW=weighted, HAS_INVERSE=inverse), "gather",
            2 if dtype in ("fp16", "bf16") else 4)
    for dense in (True, False):
        add("rows_grad", row_runs._rows_grad_kernel, dict(runs, dest_ptr="*fp32"),
            dict(DENSE=dense, HAS_SCALE=weighted), "runs")
    add("long_runs", row_runs._long_run_sums_kernel, long_runs, dict(HAS_SCALE=weighted))
    for optimizer in (pooled_fused.SGD, pooled_fused.ROWWISE_ADAGRAD, pooled_fused.ADAM, pooled_fused.EXACT_ADAGRAD,
                      pooled_fused.LARS_SGD, pooled_fused.PARTIAL_ROWWISE_ADAM, pooled_fused.LAMB,
                      pooled_fused.PARTIAL_ROWWISE_LAMB, pooled_fused.ROWWISE_ADAGRAD_DECOUPLED):
        add("fused", pooled_fused._fused_update_kernel, fused, dict(OPTIMIZER=optimizer, HAS_SCALE=weighted), "runs")
    add("rows_grad_atomic", pooled_bwd._rows_grad_atomic_kernel, dict(contrib, psw_ptr="*fp32", dest_ptr="*fp32"),
        dict(HAS_PSW=weighted))
    if weighted:
        add("psw_grad", pooled_bwd._psw_grad_kernel, dict(contrib, weights_ptr=table, out_ptr="*fp32"), {})
    # the EmbeddingCollection's forward (rows out in the tables' dtype) and its atomic backward
    seq = {k: fwd[k] for k in ("weights_ptr", "values_ptr", "offsets_ptr", "meta_ptr", "bad_ids_ptr", "batch_size",
                               "num_features")}
    add("seq_fwd", sequence_fwd._sequence_fwd_kernel, dict(seq, out_ptr=table), dict(BLOCK_F=16), "gather",
        2 if dtype in ("fp16", "bf16") else 4)
    add("seq_grad_atomic", sequence_fwd._rows_grad_atomic_kernel,
        dict(grad_out_ptr="*fp32", rows_ptr="*i64", item_offset_ptr="*i64", contrib_feature_ptr="*i32",
             meta_ptr="*i64", dest_ptr="*fp32", num_contributions="i32"), {})
    return out


# ----------------------------------------------------------------------------- the estimate

@dataclasses.dataclass
class Card:
    name: str
    copy_tbps: float  # device-to-device copy, bytes read plus written
    source: str


CARDS = [Card("H100", 3.0, "about 90% of the 3.35 TB/s datasheet peak; not measured here"),
         Card("H200", 4.3, "measured on this workplace's H200 (device/KINDS.md, 2026-10-28)")]


def program_round_trips(reading: Reading, ids_per_bag: int, unroll: int) -> float:
    """A forward program's serial round trips: the chain before its loop, then the loop's
    round trips for each of its ``ceil(L / UNROLL)`` iterations."""
    return reading.prologue_round_trips + math.ceil(ids_per_bag / unroll) * reading.round_trips


def estimate(reading: Reading, block: int, unroll: int, dim: int, ids_per_bag: int, elem_bytes: int, card: Card,
             latency_ns: float) -> float:
    """Little's law for the forward, as a fraction of copy bandwidth: each resident program
    moves ``block`` bags' rows in its serial round trips x latency, so a multiprocessor moves
    blocks_per_sm x bytes per program in that time. Bytes: the rows read and the pooled
    output written. An estimate from machine code, not a measurement."""
    rows = block * ids_per_bag * dim * elem_bytes
    out = block * dim * 4
    trips = program_round_trips(reading, ids_per_bag, unroll)
    bandwidth = MULTIPROCESSORS * reading.blocks_per_sm * (rows + out) / (trips * latency_ns * 1e-9)
    return min(1.0, bandwidth / (card.copy_tbps * 1e12))


# ----------------------------------------------------------------------------- printing

def table(readings: Sequence[Reading]) -> str:
    header = ("kernel", "variant", "regs", "local", "smem", "occ%", "row ld B", "trips/iter", "unrolled",
              "row lds/iter", "peak lds/thr", "peak KB/SM")
    rows = [header]
    for r in readings:
        rows.append((r.kernel, r.label, str(r.registers), str(r.local_bytes), str(r.shared_bytes),
                     f"{100 * r.occupancy:.0f}", str(r.row_load_bytes), f"{r.round_trips:g}",
                     f"x{r.steps_per_iteration}", str(r.row_loads_per_iteration), str(r.peak_row_loads), f"{r.peak_kb_per_sm:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/tools/codegen_report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ids", default="int64", choices=["int64", "int32"])
    parser.add_argument("--weighted", action="store_true", help="per-id weights")
    parser.add_argument("--legacy-loops", action="store_true",
                        help="the loops before the loads-in-flight rewrite (LEGACY_LOOPS=True)")
    parser.add_argument("--estimate", action="store_true",
                        help="Little's-law bandwidth estimates for the forward at 1 and 20 ids per bag")
    parser.add_argument("--json", help="also write every reading here")
    args = parser.parse_args(argv)
    variants = workload_variants(args.dtype, args.dim, args.ids, args.weighted,
                                 True if args.legacy_loops else None)
    readings = []
    for v in variants:
        readings.append(read(v))
    print(f"# triton {triton.__version__}, sm_90a; workload: {args.dtype} tables, dim {args.dim}, {args.ids} ids"
          f"{', weighted' if args.weighted else ''}{', legacy loops' if args.legacy_loops else ''}")
    print("# trips/iter: serial DRAM round trips per source iteration of the innermost gather/run loop")
    print("# (global loads one unit of latency, all else none); unrolled: source iterations per machine")
    print("# iteration; row lds/iter: per machine iteration; occupancy: theoretical, H100/H200 limits")
    print(table(readings))
    bad = [(r.kernel, r.label, p) for r in readings for p in r.unwaited]
    print(f"# decoder check: {'every load result is read after a wait on its scoreboard' if not bad else bad}")
    if args.estimate:
        print("\n# Estimated forward bandwidth, % of copy (Little's law over the whole program's round trips;")
        print("# an estimate from machine code, not a measurement)")
        elem = {"fp32": 4, "fp16": 2, "bf16": 2}[args.dtype]
        for r in readings:
            if r.kernel != "fwd":
                continue
            block, unroll = r.constexprs["BLOCK_B"], r.constexprs["UNROLL"]
            cells = []
            for card in CARDS:
                for latency in (900, 1200):
                    for n in (1, 20):
                        cells.append(f"{card.name} {latency}ns L={n}: "
                                     f"{100 * estimate(r, block, unroll, args.dim, n, elem, card, latency):.0f}%")
            print(f"{r.label} (program trips L=1: {program_round_trips(r, 1, unroll):g}, "
                  f"L=20: {program_round_trips(r, 20, unroll):g}):\n    " + ", ".join(cells))
        for card in CARDS:
            print(f"# {card.name} copy {card.copy_tbps} TB/s: {card.source}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in readings], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
