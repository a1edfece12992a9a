"""What the kernels' machine code says about their speed, read without a GPU.

    python benchmarks/tools/codegen_report.py                      # dlrm: fp32, dim 128, int64 ids
    python benchmarks/tools/codegen_report.py --dtype fp16 --dim 64 --ids int32 --json out.json

Compiles every kernel variant the library launches for one workload to sm_90a (each autotune
config, each switch the workload can set), disassembles it with the ``cuobjdump`` in Triton's
bundle, and prints per variant: registers, spills (ptxas's stack frame and spill bytes, and the spill
instructions inside the gather or run loop), shared memory, theoretical H100 occupancy by
``cuda_occupancy.h``'s rule, the width of the row loads, the serial DRAM round trips per
iteration of the gather or run loop (from the scoreboard bits, see ``sass``), and the row loads
in flight at the peak, per thread and per multiprocessor. Each variant is built as a real
launch builds it: its integer and pointer arguments are those its launch glue passes for a
dlrm-sized batch (``launch_args``), since triton specialises on multiples of 16. The quantized
forward's three loops (INT8, INT4, FP16 rows, one kernel) are read one by one. With
``--estimate`` it also turns the programs' round trips into bandwidth estimates by Little's law
(``estimate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Dict, List, Optional, Sequence

# cubin sets TRITON_INTERPRET=0 (and the tuned configs) before triton or the kernels are imported
from cubin import (compile_kernel, cuobjdump, jit_function, occupancy, ptxas_log,  # noqa: F401 (ptx_probe, tests)
                   resources)
import launch_args  # noqa: E402  (beside this script)
import sass  # noqa: E402
import triton  # noqa: E402
from variants import QUANT_STORAGE, Variant, argument_types, workload_variants  # noqa: F401 (ptx_probe)


_BUILT: Dict[tuple, object] = {}
_FLAGS_CHECKED: set = set()


def compile_variant(v: Variant):
    # the quantized forward's three storage loops are one kernel: built once, read three times
    key = (id(v.fn), tuple(sorted(v.types.items())), tuple(sorted(v.constexprs.items())), v.num_warps, v.divisible)
    if key not in _BUILT:
        _BUILT[key] = compile_kernel(v.fn, v.types, v.constexprs, v.num_warps, divisible=v.divisible)
    return _BUILT[key]



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
    row_bytes: float = 4  # bytes per element of the gathered rows
    stack_bytes: int = 0  # the stack frame per thread (cuobjdump's STACK): where spills go
    spill_store_bytes: int = 0  # ptxas -v
    spill_load_bytes: int = 0
    loop_spills: int = 0  # spill instructions (STL, LDL) inside the read loop(s)
    outer_loop_spills: int = 0  # inside any other loop (a persistent kernel's loop over tiles)
    tile_round_trips: float = 0  # a persistent kernel: round trips per pass of its outer loop
    storage: Optional[str] = None  # the quantized forwards: INT8, INT4 or FP16
    persistent: bool = False  # round_trips are per block of bags, the prologue paid once per program

    @property
    def bound_applies(self) -> bool:
        return self.loop is not None


def _quant_loop(timings, storage: int) -> int:
    """Which of the quantized forward's three loops reads ``storage``'s rows. The one kernel
    holds one loop per storage type, in no fixed order in the machine code (ptxas placed FP16's
    between the other two); a tile's rows are half a byte a column in INT4, 1 in INT8 and 2 in
    FP16, so the row bytes per thread and iteration, 1:2:4, tell them apart."""
    if len(timings) != 3:
        raise ValueError(f"the quantized forward has {len(timings)} gather loops, expected 3 (INT8, INT4, FP16)")
    by_bytes = sorted(range(3), key=lambda i: timings[i].bytes_per_iteration)
    b = [timings[i].bytes_per_iteration for i in by_bytes]
    if not (b[1] == 2 * b[0] and b[2] == 4 * b[0]):
        raise ValueError(f"the quantized forward's loops' row bytes are not 1:2:4 (INT4, INT8, FP16): {b}")
    return by_bytes[{2: 0, 1: 1, 3: 2}[storage]]


def read(v: Variant) -> Reading:
    compiled = compile_variant(v)
    cubin = compiled.asm["cubin"]
    code = next(iter(sass.parse(sass.disassemble(cubin, cuobjdump())).values()))
    res = resources(cubin)
    # ptxas's spill bytes need a second ptxas run, the report's costliest step: run where the
    # stack frame is not empty (spills go there, so an empty one means none), and once per
    # kernel to check that the rerun's flags are triton's
    if res["stack"] or v.kernel not in _FLAGS_CHECKED:
        log = ptxas_log(compiled.asm["ptx"])
        if log["registers"] != res["registers"] or log["stack_frame"] != res["stack"]:
            raise RuntimeError(f"{v.kernel} {v.label}: ptxas rerun gives {log}, the cubin {res}: not triton's flags")
        _FLAGS_CHECKED.add(v.kernel)
    else:
        log = {"spill_stores": 0, "spill_loads": 0}
    occ = occupancy(res["registers"], max(res["shared"], int(getattr(compiled.metadata, "shared", 0) or 0)),
                    v.num_warps)
    loops = sass.innermost_loops(code)
    timings = [sass.simulate(code, s, e) for s, e in loops]
    # the chain of loads before the first loop; the quantized forward's storage branches, alike up
    # to their loops, share it (code laid out after the first loop is another branch's)
    prologue = sass.prologue_round_trips(code, min(s for s, _ in loops)) if loops else 0
    if v.storage is not None and v.kernel == "quant_fwd" and timings:
        i = _quant_loop(timings, v.storage)
        loops, timings = [loops[i]], [timings[i]]
    # the compiler may unroll a loop further (LLVM did, 4 times, for 1-vector-per-thread tiles):
    # its machine iteration then holds several source iterations, each with its own row loads
    steps = [max(1, round(t.data_loads / v.row_loads_per_step(t.load_bytes))) for t in timings]
    per_step = [t.round_trips / n for t, n in zip(timings, steps)]
    worst = max(range(len(timings)), key=lambda i: (per_step[i], -timings[i].peak_in_flight), default=None)
    peak = max((t.peak_in_flight for t in timings), default=0)
    width = max((t.load_bytes for t in timings), default=0)
    inner = {i for s, e in loops for i in range(s, e + 1)}
    outer = {i for s, e in sass.loops(code) for i in range(s, e + 1)} - inner
    tiles = [(s, e) for s, e in sass.loops(code) if loops and s <= loops[0][0] and loops[0][1] <= e
             and (s, e) != loops[0]]
    return Reading(
        v.kernel, v.label, v.num_warps, res["registers"], res["local"], max(res["shared"], 0),
        occ["blocks"], occ["occupancy"], width, round(per_step[worst], 2) if timings else 0,
        steps[worst] if timings else 0, timings[worst].data_loads if timings else 0, peak,
        peak * width * 32 * occ["warps"] / 1024, sass.unwaited_reads(code),
        v.loop, prologue,
        dict(v.constexprs), v.row_bytes, res["stack"], log["spill_stores"], log["spill_loads"],
        sass.spill_instructions(code, inner), sass.spill_instructions(code, outer),
        sass.simulate(code, *max(tiles, key=lambda t: t[1] - t[0])).round_trips if tiles else 0,
        QUANT_STORAGE.get(v.storage), v.persistent)



# ----------------------------------------------------------------------------- printing

def table(readings: Sequence[Reading]) -> str:
    header = ("kernel", "variant", "regs", "local", "stack", "spill st/ld B", "loop spills", "smem", "occ%",
              "row ld B", "trips/iter", "unrolled", "row lds/iter", "peak lds/thr", "peak KB/SM")
    rows = [header]
    for r in readings:
        rows.append((r.kernel, r.label, str(r.registers), str(r.local_bytes), str(r.stack_bytes),
                     f"{r.spill_store_bytes}/{r.spill_load_bytes}", f"{r.loop_spills}/{r.outer_loop_spills}",
                     str(r.shared_bytes), f"{100 * r.occupancy:.0f}", str(r.row_load_bytes), f"{r.round_trips:g}",
                     f"x{r.steps_per_iteration}", str(r.row_loads_per_iteration), str(r.peak_row_loads),
                     f"{r.peak_kb_per_sm:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _read_key(v: Variant) -> tuple:
    """What a reading depends on: the build, and how its code is read."""
    build = (id(v.fn), tuple(sorted(v.types.items())), tuple(sorted(v.constexprs.items())), v.num_warps, v.divisible)
    return build, (v.kernel, v.label, v.loop, v.row_bytes, v.storage, v.persistent)


def _read_group(group: List[Variant]) -> List[object]:
    """Read the variants of one build (the quantized forward's storage loops), each a Reading or
    the line saying why it failed."""
    out = []
    for v in group:
        try:
            out.append(read(v))
        except Exception as e:  # noqa: BLE001 - report every variant, then fail
            out.append(f"{v.kernel} {v.label}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    return out


_TODO: List[List[Variant]] = []


def _read_group_at(i: int) -> List[object]:
    return _read_group(_TODO[i])


def read_workloads(workloads: Sequence[Sequence[str]], processes: int = 2) -> Dict[str, List[object]]:
    """For each workload (this script's arguments, as a list), its readings (or failure lines), in
    one process: a variant that several workloads launch alike is built and read once, and the
    builds are spread over ``processes`` forked workers (the quantized forward's storage loops,
    one build, stay together)."""
    per_workload, groups = {}, {}
    for workload in workloads:
        args = _parser().parse_args(list(workload))
        variants = workload_variants(args.dtype, args.dim, args.ids, args.weighted,
                                     True if args.legacy_loops else None, args.batch_size)
        if args.kernels:
            variants = [v for v in variants if v.kernel in args.kernels.split(",")]
        per_workload[" ".join(workload)] = variants
        for v in variants:
            build, how = _read_key(v)
            groups.setdefault(build, {}).setdefault(how, v)
    todo = [list(g.values()) for g in groups.values()]
    if processes > 1 and len(todo) > 1:
        import multiprocessing
        # the workers, forked before any build, find the variants (jit functions: not picklable) here
        _TODO[:] = todo
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_read_group_at, range(len(todo)), chunksize=1)
    else:
        results = [_read_group(g) for g in todo]
    done = {_read_key(v): r for group, rs in zip(todo, results) for v, r in zip(group, rs)}
    return {w: [done[_read_key(v)] for v in variants] for w, variants in per_workload.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/tools/codegen_report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ids", default="int64", choices=["int64", "int32"])
    parser.add_argument("--weighted", action="store_true", help="per-id weights")
    parser.add_argument("--legacy-loops", action="store_true",
                        help="the loops before the loads-in-flight rewrite (LEGACY_LOOPS=True)")
    parser.add_argument("--batch-size", type=int, default=launch_args.BATCH_SIZE,
                        help="the bags per feature of the launches whose arguments the variants are built with")
    parser.add_argument("--estimate", action="store_true",
                        help="Little's-law bandwidth estimates at 1 and 20 ids per bag (see estimate.py)")
    parser.add_argument("--json", help="also write every reading here")
    parser.add_argument("--kernels", help="only these kernels (comma-separated short names: fwd_short,quant_fwd_short)")
    parser.add_argument("--workloads", help="a JSON list of argument lists: read them all in one run (each variant "
                        "built once, in --processes workers) and write {workload: readings} to --json, no table")
    parser.add_argument("--processes", type=int, default=1, help="worker processes for the builds")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.workloads:
        results = read_workloads(json.loads(args.workloads), args.processes)
        failed = [f"{w}: {r}" for w, rs in results.items() for r in rs if isinstance(r, str)]
        with open(args.json, "w") as f:
            json.dump({w: [dataclasses.asdict(r) for r in rs if not isinstance(r, str)] for w, rs in results.items()}, f)
        for line in failed:
            print(f"# FAILED to build or read: {line}")
        bad = [(w, r.kernel, r.label, r.unwaited) for w, rs in results.items() for r in rs
               if not isinstance(r, str) and r.unwaited]
        print(f"# {sum(map(len, results.values()))} readings of {len(results)} workloads; decoder check: {bad or 'ok'}")
        return 1 if bad or failed else 0
    read_all = read_workloads([argv if argv is not None else sys.argv[1:]], args.processes)
    readings = [r for r in next(iter(read_all.values())) if not isinstance(r, str)]
    failed = [r for r in next(iter(read_all.values())) if isinstance(r, str)]
    print(f"# triton {triton.__version__}, sm_90a; workload: {args.dtype} tables, dim {args.dim}, {args.ids} ids"
          f"{', weighted' if args.weighted else ''}{', legacy loops' if args.legacy_loops else ''}; built with the "
          f"arguments of a launch of {launch_args.FEATURES} features x {args.batch_size} bags")
    print("# stack: the stack frame per thread, where spills go (cuobjdump STACK); spill st/ld B: ptxas -v's spill")
    print("# store/load bytes; loop spills: spill instructions (STL/LDL) in the gather/run loop / in outer loops")
    print("# trips/iter: serial DRAM round trips per source iteration of the innermost gather/run loop")
    print("# (global loads one unit of latency, all else none); unrolled: source iterations per machine")
    print("# iteration; row lds/iter: per machine iteration; occupancy: theoretical, H100/H200 limits,")
    print("# registers allocated per sub-partition as in cuda_occupancy.h")
    print(table(readings))
    bad = [(r.kernel, r.label, p) for r in readings for p in r.unwaited]
    print(f"# decoder check: {'every load result is read after a wait on its scoreboard' if not bad else bad}")
    if args.estimate:
        import estimate  # beside this script
        print()
        print(estimate.report(readings, args.dtype, args.dim, args.ids, args.weighted))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in readings], f, indent=1)
    for line in failed:
        print(f"# FAILED to build or read: {line}")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
