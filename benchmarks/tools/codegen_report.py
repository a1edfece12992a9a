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
import math
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("JAGGEDREC_AUTOTUNE", "1")  # the tuned configs, whatever the caller's setting
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import launch_args  # noqa: E402  (beside this script)
import sass  # noqa: E402

# Hopper's per-multiprocessor limits (the same on H100 and H200)
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_BLOCK = 65536
SUB_PARTITIONS = 4
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
SHARED_GRANULARITY = 128
MULTIPROCESSORS = 132
QUANT_STORAGE = {1: "INT8", 2: "INT4", 3: "FP16"}


@dataclasses.dataclass
class Variant:
    kernel: str  # a short name: fwd, rows_grad, long_runs, fused, rows_grad_atomic, psw_grad, quant_fwd
    label: str  # the switches and config that make it
    fn: object  # the jit function
    types: Dict[str, str]  # argument name -> triton type ("*fp32", "i32")
    constexprs: Dict[str, object]
    num_warps: int
    loop: Optional[str] = None  # what its innermost loop does, when the bound applies to it
    row_bytes: float = 4  # bytes per element of the rows the loop gathers (INT4: 0.5)
    divisible: Optional[Tuple[str, ...]] = None  # arguments specialised as multiples of 16 (None: the pointers)
    storage: Optional[int] = None  # the quantized forwards: the storage type whose loop is read
    persistent: bool = False  # its loop walks blocks of bags (one round trip per block is the bound)

    def row_loads_per_step(self, load_bytes: int) -> int:
        """Row-load instructions per thread in one iteration of the source loop: its tile of
        ``rows x BLOCK_D`` elements over the program's threads, ``load_bytes`` at a time."""
        c = self.constexprs
        # a persistent short-bag forward's iteration loads SHORT rows of each of its BLOCK_B bags
        rows = c.get("BLOCK_B", c.get("BLOCK_U", c.get("BLOCK_Q", 1))) * c.get("UNROLL", 1)
        if self.persistent:
            rows *= c.get("SHORT", 1)
        return max(1, int(rows * c["BLOCK_D"] * self.row_bytes) // (32 * self.num_warps * max(load_bytes, 1)))


def compile_kernel(kernel, types: Dict[str, str], constexprs: Dict[str, object], num_warps: int, arch: int = 90,
                   divisible: Optional[Sequence[str]] = None):
    """``triton.compile`` of ``kernel`` (jit or autotuned) for sm_``arch``, no GPU needed: argument
    ``types`` by name (the rest constexprs); the arguments in ``divisible`` specialised as 16-byte
    aligned pointers or multiples of 16, as triton's launcher does (None: every pointer, as torch
    allocates them)."""
    fn = jit_function(kernel)
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    consts = {(fn.arg_names.index(n),): value for n, value in constexprs.items()}
    if divisible is None:
        divisible = [n for n in fn.arg_names if types.get(n, "").startswith("*")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def jit_function(kernel):
    """The jit function of an autotuned kernel, or the kernel itself (a plain ``@triton.jit``
    one, whose ``fn`` is the Python function)."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


_BUILT: Dict[tuple, object] = {}
_FLAGS_CHECKED: set = set()


def compile_variant(v: Variant):
    # the quantized forward's three storage loops are one kernel: built once, read three times
    key = (id(v.fn), tuple(sorted(v.types.items())), tuple(sorted(v.constexprs.items())), v.num_warps, v.divisible)
    if key not in _BUILT:
        _BUILT[key] = compile_kernel(v.fn, v.types, v.constexprs, v.num_warps, divisible=v.divisible)
    return _BUILT[key]


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def cuobjdump() -> str:
    return _tool("cuobjdump")


def resources(cubin: bytes) -> Dict[str, int]:
    """Registers, stack frame, local memory and static shared memory per thread/block, from
    ``cuobjdump -res-usage``. Spills land in the stack frame (STACK), not in LOCAL."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", text.split("Function", 1)[-1]))
    return {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0))}


def ptxas_log(ptx: str) -> Dict[str, int]:
    """ptxas -v's figures for ``ptx``: registers, stack frame and spill store/load bytes. ptxas is
    run again as triton runs it (its binary for sm_90, its flags), since triton keeps no log."""
    import inspect
    import tempfile
    from triton.backends.nvidia import compiler
    ptxas = compiler.get_ptxas(90).path if hasattr(compiler, "get_ptxas") else _tool("ptxas")
    flags = ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(compiler.CUDABackend.make_cubin) else []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        text = subprocess.run([ptxas, "-lineinfo", "-v", *flags, "--gpu-name=sm_90a", os.path.join(d, "k.ptx"), "-o",
                               os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
    figures = {"registers": r"Used (\d+) registers", "stack_frame": r"(\d+) bytes stack frame",
               "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}
    return {k: int(m.group(1)) if (m := re.search(pattern, text)) else 0 for k, pattern in figures.items()}


def occupancy(registers: int, shared: int, num_warps: int) -> Dict[str, float]:
    """Resident blocks and warps per multiprocessor, by the rules of ``cuda_occupancy.h`` (our
    reading of it, for sm_90). Registers: a warp's are allocated in units of 256 (registers per
    thread x 32, rounded up), and each of the SM's 4 sub-partitions gives its own quarter of the
    register file to its warps, so an SM holds floor(16384 / registers per warp) warps per
    sub-partition, times 4, and the blocks are those warps divided by the block's warps, rounded
    down. (Dividing the whole 64K file by a block's registers, as before, overcounts: 135
    registers at 2 warps a block gives 7 blocks that way and 6 by the rule.) A block whose warps,
    rounded up to a multiple of 4, would need more than 64K registers does not launch. Shared
    memory: each block holds its own plus 1 KB reserved, in 128-byte units."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    warps_by_registers = (REGISTERS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS
    by_registers = warps_by_registers // num_warps
    if per_warp * math.ceil(num_warps / SUB_PARTITIONS) * SUB_PARTITIONS > REGISTERS_PER_BLOCK or registers > 255:
        by_registers = 0
    by_warps = MAX_WARPS_PER_SM // num_warps
    per_block = math.ceil((shared + SHARED_RESERVED_PER_BLOCK) / SHARED_GRANULARITY) * SHARED_GRANULARITY
    by_shared = SHARED_PER_SM // per_block
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


def optimizer_codes(pooled_fused) -> List[int]:
    """Every fused optimizer code the kernel module names (its upper-case integer constants)."""
    return sorted({v for k, v in vars(pooled_fused).items() if k.isupper() and type(v) is int and v > 0})


def workload_variants(dtype: str = "fp32", dim: int = 128, ids: str = "int64", weighted: bool = False,
                      legacy: Optional[bool] = None, batch_size: int = launch_args.BATCH_SIZE) -> List[Variant]:
    """Every variant the library launches for tables of ``dtype`` and ``dim`` with ``ids``
    ids: the forward (plain and VBE; the short-bag forward, persistent, and its pass for long
    bags), the quantized forward (INT8, INT4, FP16 rows; the short-bag one per storage type,
    and the general one's pass for long bags), the hash tables' probe-and-gather, the
    deterministic backward (dense and compact gradients, and the long runs' sums), the fused
    step for each optimizer, and the atomic backward; each at every autotune config. The
    kernels with a recorded launch glue (``launch_args``) are built with its arguments for a
    batch of ``batch_size`` bags; the run-tile kernels take only pointers. ``legacy`` sets
    LEGACY_LOOPS (None: the kernels' default, False)."""
    from jaggedrec.kernels import (hash_probe, pooled_bwd, pooled_fused, pooled_fwd, pooled_fwd_short, quant_fwd,
                                   quant_fwd_short, row_runs, sequence_fwd)
    from jaggedrec.kernels.common import block_d

    fwd, runs, fused, long_runs, contrib, table = argument_types(dtype, ids)
    dims = dict(BLOCK_D=block_d(dim), DIM_ALIGN=_alignment(dim))
    switch = {"LEGACY_LOOPS": bool(legacy)}
    recorded = launch_args.launches(dtype, dim, ids, weighted, batch_size=batch_size)
    out: List[Variant] = []

    def add(kernel, fn, types, constexprs, loop=None, row_bytes=4, glue=None, storages=(None,), persistent=False):
        jit = jit_function(fn)
        params = {p.name for p in jit.params if p.is_constexpr}
        divisible = None
        configs = getattr(fn, "configs", None)
        if glue is not None:  # the launch's own arguments: types, constants, multiples of 16
            types, passed, divisible = launch_args.specialise(fn, recorded[glue])
            if configs is None:  # a plain jit kernel: its launch passes the block sizes and warps
                tuned = {k: passed.pop(k) for k in list(passed) if k.startswith("BLOCK_") and k != "BLOCK_D"}
                configs = [launch_args.triton_config(tuned, recorded[glue].get("num_warps", 4))]
            constexprs = dict(passed, **constexprs)  # the switches this report sets over the glue's
            divisible = tuple(divisible)
        else:
            launch_args.check_no_integers(fn, types)
        shown = {k: v for k, v in constexprs.items() if k in ("HAS_PSW", "HAS_INVERSE", "DENSE", "HAS_SCALE",
                                                              "OPTIMIZER", "BLOCK_F", "SHORT", "BUCKET_SIZE")}
        for config in configs:
            full = dict(dims, ROW_STRIDE=dim, ONE_TILE=dim <= dims["BLOCK_D"], **constexprs)
            full = {k: v for k, v in dict(full, **switch).items() if k in params}
            full.update(config.kwargs)
            for storage in storages:
                what = [QUANT_STORAGE[storage]] if storage else []
                label = " ".join(what + [f"{k}={v}" for k, v in shown.items()]
                                 + [f"{k}={v}" for k, v in config.kwargs.items()] + [f"warps={config.num_warps}"])
                bytes_ = {1: 1, 2: 0.5, 3: 2}[storage] if storage else row_bytes
                out.append(Variant(kernel, label, fn, types, full, config.num_warps, loop, bytes_, divisible, storage,
                                   persistent))

    elem = 2 if dtype in ("fp16", "bf16") else 4
    add("fwd", pooled_fwd._pooled_fwd_kernel, fwd, dict(HAS_PSW=weighted, HAS_INVERSE=False), "gather", elem,
        glue="pooled_fwd._pooled_fwd_kernel")
    # VBE: each output row reads its bag through the inverse index
    add("fwd", pooled_fwd._pooled_fwd_kernel, fwd, dict(HAS_PSW=weighted, HAS_INVERSE=True), "gather", elem,
        glue="pooled_fwd._pooled_fwd_kernel VBE")
    # the quantized forward: one kernel, a loop per storage type, each read
    add("quant_fwd", quant_fwd._quant_fwd_kernel, {}, dict(HAS_PSW=weighted), "gather",
        glue="quant_fwd._quant_fwd_kernel", storages=(1, 2, 3))
    for dense in (True, False):
        add("rows_grad", row_runs._rows_grad_kernel, dict(runs, dest_ptr="*fp32"),
            dict(DENSE=dense, HAS_SCALE=weighted), "runs")
    add("long_runs", row_runs._long_run_sums_kernel, long_runs, dict(HAS_SCALE=weighted), "long runs")
    for optimizer in optimizer_codes(pooled_fused):
        add("fused", pooled_fused._fused_update_kernel, fused, dict(OPTIMIZER=optimizer, HAS_SCALE=weighted), "runs")
    add("rows_grad_atomic", pooled_bwd._rows_grad_atomic_kernel, {}, dict(HAS_PSW=weighted),
        glue="pooled_bwd._rows_grad_atomic_kernel")
    if weighted:
        add("psw_grad", pooled_bwd._psw_grad_kernel, {}, {}, glue="pooled_bwd._psw_grad_kernel")
    # the EmbeddingCollection's forward (rows out in the tables' dtype) and its atomic backward
    add("seq_fwd", sequence_fwd._sequence_fwd_kernel, {}, {}, "gather", elem,
        glue="sequence_fwd._sequence_fwd_kernel")
    add("seq_grad_atomic", sequence_fwd._rows_grad_atomic_kernel, {}, {}, glue="sequence_fwd._rows_grad_atomic_kernel")
    # batches of about one id per bag: the persistent short-bag forwards (SHORT ids per bag pipelined,
    # 1 at the workload's one id per bag, 2 as the op layer picks up to two), and their passes for the
    # longer bags: pooled_fwd_short's own kernel, and the general quantized kernel launched with SHORT
    if dim <= pooled_fwd_short.MAX_DIM:
        for short in (1, 2):
            add("fwd_short", pooled_fwd_short._pooled_fwd_short_kernel, {}, dict(HAS_PSW=weighted, SHORT=short),
                "gather", elem, glue="pooled_fwd_short._pooled_fwd_short_kernel", persistent=True)
        add("fwd_long_bags", pooled_fwd_short._long_bags_kernel, {}, dict(HAS_PSW=weighted), "gather", elem,
            glue="pooled_fwd_short._long_bags_kernel")
        for storage in (1, 2, 3):
            for short in (1, 2):
                add("quant_fwd_short", quant_fwd_short._quant_fwd_short_kernel, {}, dict(HAS_PSW=weighted, SHORT=short),
                    "gather", {1: 1, 2: 0.5, 3: 2}[storage], glue=f"quant_fwd_short._quant_fwd_short_kernel {storage}",
                    persistent=True)
                out[-1].storage = storage
                out[-1].label = f"{QUANT_STORAGE[storage]} {out[-1].label}"
        add("quant_fwd", quant_fwd._quant_fwd_kernel, {}, dict(HAS_PSW=weighted), "gather",
            glue="quant_fwd._quant_fwd_kernel SHORT", storages=(1, 2, 3))
    # hashed tables: probe the bucket and gather the row, one bag per program (fp32 tables, unweighted)
    if dtype == "fp32" and not weighted:
        add("hash_probe", hash_probe.hash_probe_pooled_kernel, {}, {}, "probe", glue="hash_probe.hash_probe_pooled_kernel")
    return out


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
