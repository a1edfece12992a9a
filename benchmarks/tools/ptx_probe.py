"""Compile the kernels for an sm_90 GPU (no GPU needed: PTX only) and count their global
memory instructions by kind. Run as a script, without TRITON_INTERPRET (``test_codegen``).

    python benchmarks/tools/ptx_probe.py ALIGNMENT   ->  {"fwd": {"ld.global.v4.b32": 8, ...}, ...}
    python benchmarks/tools/ptx_probe.py sweep       ->  {"compiled": 219, "failed": ["fwd HAS_PSW=True ...", ...], ...}
    python benchmarks/tools/ptx_probe.py sweep --strict   (the same, exiting with 1 when a variant fails)
    python benchmarks/tools/ptx_probe.py sweep --every 4  (every 4th variant, each kernel's first always)

``sweep`` builds every variant the library can launch, so that a Triton release that cannot
build one is found before a GPU is spent on it: every combination of each kernel's constexpr
switches at every autotune config (the tuned ones and JAGGEDREC_AUTOTUNE=0's), then each table
dtype, id dtype, per-id weight dtype and dim layout at every config. Triton 3.6, which the GPU
machines have, failed on the backward's run sums, and on the forward without bounds checks at
32+ bags (a single config per switch, as the sweep once built, missed that); 3.9 built both.
Builds run in two processes (``JAGGEDREC_SWEEP_PROCESSES``); a kernel constexpr the sweep
does not cover counts as a failure.
"""

import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter

os.environ["JAGGEDREC_AUTOTUNE"] = "1"  # the kernels' configs are the tuned ones, whatever the caller's setting

import triton
from codegen_report import argument_types, compile_kernel, jit_function  # beside this script
from jaggedrec.kernels import (hash_probe, pooled_bwd, pooled_fused, pooled_fwd, pooled_fwd_short, quant_fwd,
                               quant_fwd_short, row_runs, sequence_fwd)
from jaggedrec.kernels.common import block_d


def ptx(kernel, types, constexprs, num_warps=4):
    return compile_kernel(kernel, types, constexprs, num_warps).asm["ptx"]


def ptx_ops(kernel, types, constexprs, num_warps=4):
    return Counter(re.findall(r"(?:ld|st|red|atom)\.global[\.\w]*", ptx(kernel, types, constexprs, num_warps)))


f32 = "*fp32"
FWD, RUNS, FUSED, LONG, CONTRIB, _ = argument_types("fp32", "int64")  # the same tables as the report's
SEQ = {"weights_ptr": f32, "values_ptr": "*i64", "offsets_ptr": "*i64", "meta_ptr": "*i64", "out_ptr": f32,
       "bad_ids_ptr": "*i64", "batch_size": "i32", "num_features": "i32"}
QUANT = {"int8_ptr": "*u8", "int4_ptr": "*u8", "fp16_ptr": "*u8", "values_ptr": "*i64", "offsets_ptr": "*i64",
         "psw_ptr": f32, "meta_ptr": "*i64", "out_ptr": f32, "bad_ids_ptr": "*i64", "batch_size": "i32",
         "out_stride": "i32", "num_features": "i32"}
QUANT_SHORT = {"table_ptr": "*u8", "values_ptr": "*i64", "offsets_ptr": "*i64", "psw_ptr": f32, "meta_ptr": "*i64",
               "out_ptr": f32, "bad_ids_ptr": "*i64", "batch_size": "i32", "out_stride": "i32", "num_features": "i32"}
SHORT_FWD = dict(FWD)
HASH = {"values_ptr": "*i64", "offsets_ptr": "*i64", "keys_ptr": "*i64", "weight_ptr": f32, "out_ptr": f32,
        "meta_ptr": "*i64", "fallback_ptr": "*i64", "batch_size": "i32", "out_stride": "i32",
        "num_bags": "i32"}
POSITION_GRAD = {"grad_out_ptr": f32, "grad_stride": "i32", "weights_ptr": f32, "values_ptr": "*i64",
                 "offsets_ptr": "*i64", "meta_ptr": "*i64", "position_meta_ptr": "*i64", "out_ptr": f32,
                 "num_features": "i32", "batch_size": "i32"}
SEQ_ATOMIC = {"grad_out_ptr": f32, "rows_ptr": "*i64", "item_offset_ptr": "*i64", "contrib_feature_ptr": "*i32",
              "meta_ptr": "*i64", "dest_ptr": f32, "num_contributions": "i32"}


# The dims a launch can have, as the launchers turn them into constexprs: BLOCK_D from the
# widest dim (common.block_d: dim 130 loops over 128-wide tiles), DIM_ALIGN the power of two
# dividing every dim and offset, ROW_STRIDE the widest dim, ONE_TILE whether it fits one tile.
def dims(max_dim, align):
    bd = block_d(max_dim)
    return dict(BLOCK_D=bd, DIM_ALIGN=align, ROW_STRIDE=max_dim, ONE_TILE=max_dim <= bd, LEGACY_LOOPS=False)


BASE_DIMS = dims(64, 4)
DIM_VARIANTS = [("dim 1", dims(1, 1)), ("dim 130", dims(130, 2))]
TABLES = [("fp16 tables", {"weights_ptr": "*fp16"}), ("bf16 tables", {"weights_ptr": "*bf16"})]
# 16-byte vectors of a 16-bit table need 8-aligned dims (fp32 gets them from 4 on)
ALIGNED_16BIT = ("fp16 tables 16-aligned", {"weights_ptr": "*fp16"}, dims(64, 16))
PSW = [("fp16 per-id weights", {"psw_ptr": "*fp16"}), ("fp64 per-id weights", {"psw_ptr": "*fp64"})]


def _kernels():
    """(name, kernel, argument types, switches, extra variants). Every combination of the
    switches is built at every config; each extra variant (what, types, constexprs) at every
    config, with the switches at their first values unless it sets them."""
    tables = [(w, t, {}) for w, t in TABLES] + [ALIGNED_16BIT]
    psw = [(w, t, dict(HAS_PSW=True)) for w, t in PSW]
    wide = [(w, {}, c) for w, c in DIM_VARIANTS]
    i32_ids = [("int32 ids", {"values_ptr": "*i32", "offsets_ptr": "*i32"}, {})]
    i32_offsets = [("int32 offsets", {"offsets_ptr": "*i32"}, {})]
    # the loops before they were pipelined, kept selectable until a GPU has timed both
    legacy = [("legacy loops", {}, dict(LEGACY_LOOPS=True))]
    # the fused kinds of the weight-decay modes (10 row-wise Adagrad COUNTER/COWCLIP, 11 Adam and
    # 12 exact Adagrad decoupled) and stochastic rounding of 16-bit tables, each at every config
    fused_extra = [(f"optimizer {k}", {}, dict(OPTIMIZER=k)) for k in (10, 11, 12)]
    fused_extra += [(f"stochastic rounding, {w}", t, dict(STOCHASTIC=True)) for w, t in TABLES]
    # max_norm: rows renormalised in the one-tile step, and over column tiles (a second pass)
    fused_extra += [("max_norm", {}, dict(MAX_NORM=True)), ("max_norm, LAMB tiles", {}, dict(
        MAX_NORM=True, OPTIMIZER=7, ONE_TILE=False)), ("max_norm, tiles", {}, dict(MAX_NORM=True, ONE_TILE=False))]
    return [
        ("fwd", pooled_fwd._pooled_fwd_kernel, FWD,
         dict(HAS_PSW=[False, True], HAS_INVERSE=[False, True], POSITIONAL=[False, True]),
         tables + i32_ids + wide + psw + legacy),
        ("rows_grad", row_runs._rows_grad_kernel, dict(RUNS, dest_ptr=f32),
         dict(DENSE=[True, False], HAS_SCALE=[False, True]), wide + legacy),
        ("long_runs", row_runs._long_run_sums_kernel, LONG, dict(HAS_SCALE=[False, True]), wide + legacy),
        ("fused", pooled_fused._fused_update_kernel, FUSED,
         dict(OPTIMIZER=[2, 1, 3, 4, 5, 6, 7, 8, 9], ONE_TILE=[True, False], HAS_SCALE=[False, True]),
         tables + wide + legacy + fused_extra),
        ("rows_grad_atomic", pooled_bwd._rows_grad_atomic_kernel, dict(CONTRIB, psw_ptr=f32, dest_ptr=f32),
         dict(HAS_PSW=[False, True]), i32_offsets + wide + psw),
        ("psw_grad", pooled_bwd._psw_grad_kernel, dict(CONTRIB, weights_ptr=f32, out_ptr=f32), {},
         tables + i32_offsets + wide),
        # the position weights' gradient (the FPEBC's), one program per position weight
        ("position_grad", pooled_bwd._position_grad_kernel, POSITION_GRAD, {}, tables + i32_ids + wide),
        # the sequence forward writes rows in the tables' dtype; BLOCK_F covers the feature count
        ("seq_fwd", sequence_fwd._sequence_fwd_kernel, SEQ, dict(BLOCK_F=[16, 128]),
         [(w, dict(t, out_ptr=t["weights_ptr"]), c) for w, t, c in tables] + i32_ids + wide),
        ("seq_grad_atomic", sequence_fwd._rows_grad_atomic_kernel, SEQ_ATOMIC, {}, wide),
        # quantized tables: every storage type in one kernel; rows 16- or 4-byte aligned
        ("quant_fwd", quant_fwd._quant_fwd_kernel, QUANT, dict(HAS_PSW=[False, True], ROW_ALIGN=[16, 4], SHORT=[0, 2]),
         i32_ids + wide + [(w, t, {}) for w, t in PSW]),
        # short bags: the persistent forwards (the quantized one per storage type) and the long bags' pass
        ("fwd_short", pooled_fwd_short._pooled_fwd_short_kernel, SHORT_FWD,
         dict(HAS_PSW=[False, True], HAS_INVERSE=[False, True], SHORT=[1, 2]), tables + i32_ids + psw),
        ("fwd_long_bags", pooled_fwd_short._long_bags_kernel, SHORT_FWD,
         dict(HAS_PSW=[False, True], HAS_INVERSE=[False, True], SHORT=[1]), tables + i32_ids + [wide[0]]),
        ("quant_fwd_short", quant_fwd_short._quant_fwd_short_kernel, QUANT_SHORT,
         dict(STORAGE=[1, 2, 3], HAS_PSW=[False, True], SHORT=[1, 2], ROW_ALIGN=[16]),
         [("rows 4-aligned", {}, dict(ROW_ALIGN=4))] + i32_ids + [wide[0]] + [(w, t, {}) for w, t in PSW]),
        # the hash probe: buckets of 8 (the default), of 1 and 16 through windows of 8 and 16 keys
        ("hash_probe", hash_probe.hash_probe_pooled_kernel, HASH, dict(BUCKET_SIZE=[8, 1], WINDOW=[8]), [
            ("int32 ids", {"values_ptr": "*i32", "offsets_ptr": "*i32"}, {}),
            ("buckets of 16", {}, dict(BUCKET_SIZE=16, WINDOW=16))] + wide),
    ]


# the plain jit kernels' launch configs, as their glue passes them
PLAIN_CONFIGS = {"fwd_long_bags": [triton.Config({"BLOCK_B": 64}, num_warps=8)],
                 "hash_probe": [triton.Config({"BLOCK_B": 16}, num_warps=4)]}


def _untuned_configs():
    """Per kernel, the config it launches with JAGGEDREC_AUTOTUNE=0 (correctness runs on GPUs)."""
    os.environ["JAGGEDREC_AUTOTUNE"] = "0"
    try:
        return {"fwd": pooled_fwd._configs(), "rows_grad": row_runs.rows_grad_configs(),
                "long_runs": row_runs._long_run_config(), "fused": row_runs.run_configs(),
                "rows_grad_atomic": pooled_bwd._q_configs([]), "psw_grad": pooled_bwd._q_configs([]),
                "position_grad": pooled_bwd._b_configs(),
                "seq_fwd": sequence_fwd._configs(), "seq_grad_atomic": sequence_fwd._atomic_configs(),
                "quant_fwd": quant_fwd._configs(), "fwd_short": pooled_fwd_short._configs(),
                "quant_fwd_short": quant_fwd_short._configs(), **PLAIN_CONFIGS}
    finally:
        os.environ["JAGGEDREC_AUTOTUNE"] = "1"


def variants():
    """Every (label, kernel name, argument types, constexprs, num_warps) the sweep builds, and
    the constexprs of a kernel that it does not cover (a new switch must be added here)."""
    out, uncovered = [], []
    untuned = _untuned_configs()
    for name, kernel, types, switches, extras in _kernels():
        configs = list({(tuple(sorted(c.kwargs.items())), c.num_warps): c
                        for c in getattr(kernel, "configs", []) + untuned[name]}.values())
        params = {p.name for p in jit_function(kernel).params if p.is_constexpr}
        # a constexpr is covered by a switch, a config, the base dims, or an extra variant that sets it
        covered = (set(switches) | set(BASE_DIMS) | {k for c in configs for k in c.kwargs}
                   | {k for _, _, extra in extras for k in extra})
        uncovered += [f"{name}: constexpr {p} is not swept" for p in sorted(params - covered)]
        first = {k: v[0] for k, v in switches.items()}
        combos = [("", dict(zip(switches, values)), {}) for values in itertools.product(*switches.values())]
        combos += [(" " + what, dict(first, **extra), extra_types) for what, extra_types, extra in extras]
        for what, constexprs, extra_types in combos:
            for c in configs:
                full = {k: v for k, v in dict(BASE_DIMS, **constexprs).items() if k in params}
                full.update(c.kwargs)
                label = " ".join(f"{k}={v}" for k, v in constexprs.items() if k in switches)
                out.append((f"{name}{what} {label} config {c.kwargs} warps {c.num_warps}".replace("  ", " "),
                            name, dict(types, **extra_types), full, c.num_warps))
    return out, uncovered


def _build(variant):
    label, name, types, constexprs, num_warps = variant
    kernel = KERNELS[name]
    try:
        ptx(kernel, types, constexprs, num_warps)
        return None
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        return f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def sweep(processes=2, every=1):
    """Build every variant (see ``variants``), or every ``every``-th and each kernel's first, in
    ``processes`` worker processes: the count built, the failures, and the time taken."""
    todo, uncovered = variants()
    total, firsts = len(todo), {}
    for v in todo:
        firsts.setdefault(v[1], v[0])
    todo = [v for i, v in enumerate(todo) if i % every == 0 or firsts[v[1]] == v[0]]
    start = time.time()
    if processes > 1:
        # forked before any build; compiles are independent, so they split evenly
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_build, todo, chunksize=4)
    else:
        results = [_build(v) for v in todo]
    failed = [r for r in results if r]
    return {"compiled": len(todo) - len(failed), "failed": uncovered + failed, "built": len(todo), "variants": total,
            "seconds": round(time.time() - start, 1), "triton": triton.__version__}


KERNELS = {name: kernel for name, kernel, *_ in _kernels()}

if sys.argv[1] == "sweep":
    every = int(sys.argv[sys.argv.index("--every") + 1]) if "--every" in sys.argv else 1
    result = sweep(int(os.environ.get("JAGGEDREC_SWEEP_PROCESSES", "2")), every)
    print(json.dumps(result))
    # --strict (CI): the exit status says whether every variant built
    sys.exit(1 if "--strict" in sys.argv and result["failed"] else 0)
align = int(sys.argv[1])
out = {}
out["fwd"] = ptx_ops(pooled_fwd._pooled_fwd_kernel, FWD,
                     dict(HAS_PSW=False, HAS_INVERSE=False, BLOCK_D=64, DIM_ALIGN=align, LEGACY_LOOPS=False,
                          BLOCK_B=32, UNROLL=2))
out["rows_grad"] = ptx_ops(row_runs._rows_grad_kernel, dict(RUNS, dest_ptr=f32),
                           dict(DENSE=True, ROW_STRIDE=64, HAS_SCALE=True, DIM_ALIGN=align, BLOCK_D=64, BLOCK_U=32,
                                UNROLL=2, LEGACY_LOOPS=False))
out["fused_adagrad"] = ptx_ops(pooled_fused._fused_update_kernel, FUSED,
                               dict(OPTIMIZER=2, HAS_SCALE=False, DIM_ALIGN=align, ROW_STRIDE=64, BLOCK_D=64,
                                    ONE_TILE=True, BLOCK_U=32, UNROLL=2, LEGACY_LOOPS=False))
out["long_runs"] = ptx_ops(row_runs._long_run_sums_kernel, LONG,
                           dict(ROW_STRIDE=64, HAS_SCALE=True, DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
out["rows_grad_atomic"] = ptx_ops(pooled_bwd._rows_grad_atomic_kernel, dict(CONTRIB, psw_ptr=f32, dest_ptr=f32),
                                  dict(HAS_PSW=False, DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
out["psw_grad"] = ptx_ops(pooled_bwd._psw_grad_kernel, dict(CONTRIB, weights_ptr=f32, out_ptr=f32),
                          dict(DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
out["seq_fwd"] = ptx_ops(sequence_fwd._sequence_fwd_kernel, SEQ,
                        dict(BLOCK_F=16, BLOCK_D=64, DIM_ALIGN=align, BLOCK_B=32, UNROLL=2))
out["quant_fwd"] = ptx_ops(quant_fwd._quant_fwd_kernel, QUANT,
                          dict(HAS_PSW=False, BLOCK_D=64, ROW_ALIGN=16, DIM_ALIGN=align, SHORT=0, BLOCK_B=32))
out["seq_grad_atomic"] = ptx_ops(sequence_fwd._rows_grad_atomic_kernel, SEQ_ATOMIC,
                                 dict(BLOCK_D=64, DIM_ALIGN=align, BLOCK_Q=32))
print(json.dumps(out))
