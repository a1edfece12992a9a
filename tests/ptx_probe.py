"""Compile the kernels for an sm_90 GPU (no GPU needed: PTX only) and count their global
memory instructions by kind. Run as a script, without TRITON_INTERPRET (``test_codegen``).

    python tests/ptx_probe.py ALIGNMENT   ->  {"fwd": {"ld.global.v4.b32": 8, ...}, ...}
    python tests/ptx_probe.py sweep       ->  {"compiled": 61, "failed": ["fused OPTIMIZER=3 ...", ...]}

``sweep`` compiles every variant the library can launch (each constexpr switch, table dtype,
id dtype and autotune config), so that a Triton release that cannot build one of them is
found before a GPU is spent on it: triton 3.6, which the GPU machines have, failed on the
backward's run sums while 3.9 built them.
"""

import json
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jaggedrec.kernels import pooled_bwd, pooled_fused, pooled_fwd, row_runs

def ptx(kernel, types, constexprs, num_warps=4):
    fn = getattr(kernel, "fn", kernel) if hasattr(kernel, "configs") else kernel  # under triton.autotune or not
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    # pointer arguments 16-byte aligned, as torch allocates them
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def ptx_ops(kernel, types, constexprs, num_warps=4):
    return Counter(re.findall(r"(?:ld|st|red|atom)\.global[\.\w]*", ptx(kernel, types, constexprs, num_warps)))


f32, i64 = "*fp32", "*i64"
FWD = {"weights_ptr": f32, "values_ptr": i64, "offsets_ptr": i64, "psw_ptr": f32, "meta_ptr": i64, "out_ptr": f32,
       "errors_ptr": i64, "batch_size": "i32", "out_stride": "i32", "num_features": "i32"}
RUNS = {n: i64 for n in ["num_runs_ptr", "run_start_ptr", "run_row_ptr", "run_feature_ptr", "item_offset_ptr",
                         "long_rank_ptr", "meta_ptr"]}
RUNS.update(grad_out_ptr=f32, item_scale_ptr=f32, long_sums_ptr=f32)
FUSED = dict(RUNS, weights_ptr=f32, state1_ptr=f32, state2_ptr=f32, hparams_ptr=f32, step_ptr=i64)
LONG = dict(grad_out_ptr=f32, num_long_ptr=i64, long_runs_ptr=i64, run_start_ptr=i64, run_feature_ptr=i64,
            item_offset_ptr=i64, item_scale_ptr=f32, meta_ptr=i64, long_sums_ptr=f32)
CONTRIB = dict(grad_out_ptr=f32, grad_stride="i32", rows_ptr=i64, contrib_feature_ptr="*i32", bag_of_value_ptr=i64,
               offsets_ptr=i64, meta_ptr=i64, num_contributions="i32", num_values="i32", batch_size="i32",
               max_dim="i32")


def sweep():
    """Compile each kernel for every autotune config at a base variant, then each switch,
    table dtype and id dtype off that base; return the variants that failed."""
    kernels = [  # (name, kernel, argument types, base constexprs, variants: (what, types, constexprs))
        ("fwd", pooled_fwd._pooled_fwd_kernel, FWD,
         dict(HAS_PSW=False, BOUNDS_CHECK=True, BLOCK_D=64, DIM_ALIGN=4),
         [("psw", {}, dict(HAS_PSW=True)), ("no bounds check", {}, dict(BOUNDS_CHECK=False)),
          ("fp16", {"weights_ptr": "*fp16"}, {}), ("bf16", {"weights_ptr": "*bf16"}, {}),
          ("int32 ids", {"values_ptr": "*i32", "offsets_ptr": "*i32"}, {}), ("dim 130", {}, dict(BLOCK_D=256,
                                                                                                 DIM_ALIGN=2)),
          ("odd dims", {}, dict(DIM_ALIGN=1, BLOCK_D=8))]),
        ("rows_grad", row_runs._rows_grad_kernel, dict(RUNS, dest_ptr=f32),
         dict(DENSE=True, ROW_STRIDE=64, HAS_SCALE=False, DIM_ALIGN=4, BLOCK_D=64),
         [("compact", {}, dict(DENSE=False)), ("scale", {}, dict(HAS_SCALE=True)),
          ("odd dims", {}, dict(DIM_ALIGN=1, BLOCK_D=8, ROW_STRIDE=7))]),
        ("long_runs", row_runs._long_run_sums_kernel, LONG,
         dict(ROW_STRIDE=64, HAS_SCALE=False, DIM_ALIGN=4, BLOCK_D=64),
         [("scale", {}, dict(HAS_SCALE=True)), ("odd dims", {}, dict(DIM_ALIGN=1, BLOCK_D=8, ROW_STRIDE=7))]),
        ("fused", pooled_fused._fused_update_kernel, FUSED,
         dict(OPTIMIZER=2, HAS_SCALE=False, DIM_ALIGN=4, ROW_STRIDE=64, BLOCK_D=64, ONE_TILE=True),
         [(f"OPTIMIZER={o} ONE_TILE={t}", {}, dict(OPTIMIZER=o, ONE_TILE=t)) for o in (1, 2, 3) for t in (True, False)]
         + [("scale", {}, dict(HAS_SCALE=True)), ("fp16", {"weights_ptr": "*fp16"}, {}),
            ("bf16", {"weights_ptr": "*bf16"}, {}), ("odd dims", {}, dict(DIM_ALIGN=1, BLOCK_D=8, ROW_STRIDE=7))]),
        ("rows_grad_atomic", pooled_bwd._rows_grad_atomic_kernel, dict(CONTRIB, psw_ptr=f32, dest_ptr=f32),
         dict(HAS_PSW=False, DIM_ALIGN=4, BLOCK_D=64), [("psw", {}, dict(HAS_PSW=True))]),
        ("psw_grad", pooled_bwd._psw_grad_kernel, dict(CONTRIB, weights_ptr=f32, out_ptr=f32),
         dict(DIM_ALIGN=4, BLOCK_D=64), [("fp16", {"weights_ptr": "*fp16"}, {})]),
    ]
    compiled, failed = 0, []
    for name, kernel, types, base, variants in kernels:
        configs = [(f"config {c.kwargs} warps {c.num_warps}", {}, dict(c.kwargs), c.num_warps) for c in kernel.configs]
        first = dict(configs[0][2])
        for what, extra_types, extra, *warps in configs + [v + (kernel.configs[0].num_warps,) for v in variants]:
            constexprs = dict(base, **first)
            constexprs.update(extra)
            try:
                ptx(kernel, dict(types, **extra_types), constexprs, *warps)
                compiled += 1
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                failed.append(f"{name} {what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return {"compiled": compiled, "failed": failed}


if sys.argv[1] == "sweep":
    print(json.dumps(sweep()))
    sys.exit(0)
align = int(sys.argv[1])
out = {}
out["fwd"] = ptx_ops(pooled_fwd._pooled_fwd_kernel, FWD,
                     dict(HAS_PSW=False, BOUNDS_CHECK=True, BLOCK_D=64, DIM_ALIGN=align, BLOCK_B=32, UNROLL=2))
out["rows_grad"] = ptx_ops(row_runs._rows_grad_kernel, dict(RUNS, dest_ptr=f32),
                           dict(DENSE=True, ROW_STRIDE=64, HAS_SCALE=True, DIM_ALIGN=align, BLOCK_D=64, BLOCK_U=32,
                                UNROLL=2))
out["fused_adagrad"] = ptx_ops(pooled_fused._fused_update_kernel, FUSED,
                               dict(OPTIMIZER=2, HAS_SCALE=False, DIM_ALIGN=align, ROW_STRIDE=64, BLOCK_D=64,
                                    ONE_TILE=True, BLOCK_U=32, UNROLL=2))
out["long_runs"] = ptx_ops(row_runs._long_run_sums_kernel, LONG,
                           dict(ROW_STRIDE=64, HAS_SCALE=True, DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
out["rows_grad_atomic"] = ptx_ops(pooled_bwd._rows_grad_atomic_kernel, dict(CONTRIB, psw_ptr=f32, dest_ptr=f32),
                                  dict(HAS_PSW=False, DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
out["psw_grad"] = ptx_ops(pooled_bwd._psw_grad_kernel, dict(CONTRIB, weights_ptr=f32, out_ptr=f32),
                          dict(DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
print(json.dumps(out))
