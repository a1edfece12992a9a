"""Compile the kernels for an sm_90 GPU (no GPU needed: PTX only) and count their global
memory instructions by kind. Run as a script, without TRITON_INTERPRET (``test_codegen``).

    python tests/ptx_probe.py ALIGNMENT   ->  {"fwd": {"ld.global.v4.b32": 8, ...}, ...}
"""

import json
import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jaggedrec.kernels import pooled_bwd, pooled_fused, pooled_fwd, row_runs

def ptx_ops(kernel, types, constexprs, num_warps=4):
    fn = getattr(kernel, "fn", kernel) if hasattr(kernel, "configs") else kernel  # under triton.autotune or not
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    # pointer arguments 16-byte aligned, as torch allocates them
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "").startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
    return Counter(re.findall(r"(?:ld|st|red|atom)\.global[\.\w]*", ptx))


align = int(sys.argv[1])
f32, i64 = "*fp32", "*i64"
out = {}
out["fwd"] = ptx_ops(pooled_fwd._pooled_fwd_kernel, {
    "weights_ptr": f32, "values_ptr": i64, "offsets_ptr": i64, "psw_ptr": f32, "meta_ptr": i64, "out_ptr": f32,
    "errors_ptr": i64, "batch_size": "i32", "out_stride": "i32", "num_features": "i32"},
    dict(HAS_PSW=False, BOUNDS_CHECK=True, BLOCK_D=64, DIM_ALIGN=align, BLOCK_B=32, UNROLL=2))
runs = {n: i64 for n in ["num_runs_ptr", "run_start_ptr", "run_row_ptr", "run_feature_ptr", "item_offset_ptr",
                          "long_rank_ptr", "meta_ptr"]}
runs.update(grad_out_ptr=f32, item_scale_ptr=f32, long_sums_ptr=f32)
out["rows_grad"] = ptx_ops(row_runs._rows_grad_kernel, dict(runs, dest_ptr=f32),
                           dict(DENSE=True, ROW_STRIDE=64, HAS_SCALE=True, DIM_ALIGN=align, BLOCK_D=64, BLOCK_U=32,
                                UNROLL=2))
out["fused_adagrad"] = ptx_ops(pooled_fused._fused_update_kernel, dict(
    runs, weights_ptr=f32, state1_ptr=f32, state2_ptr=f32, hparams_ptr=f32, step_ptr=i64),
    dict(OPTIMIZER=2, HAS_SCALE=False, DIM_ALIGN=align, ROW_STRIDE=64, BLOCK_D=64, ONE_TILE=True, BLOCK_U=32,
         UNROLL=2))
out["long_runs"] = ptx_ops(row_runs._long_run_sums_kernel, dict(
    grad_out_ptr=f32, num_long_ptr=i64, long_runs_ptr=i64, run_start_ptr=i64, run_feature_ptr=i64,
    item_offset_ptr=i64, item_scale_ptr=f32, meta_ptr=i64, long_sums_ptr=f32),
    dict(ROW_STRIDE=64, HAS_SCALE=True, DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
contrib = dict(grad_out_ptr=f32, grad_stride="i32", rows_ptr=i64, contrib_feature_ptr="*i32", bag_of_value_ptr=i64,
               offsets_ptr=i64, meta_ptr=i64, num_contributions="i32", num_values="i32", batch_size="i32",
               max_dim="i32")
out["rows_grad_atomic"] = ptx_ops(pooled_bwd._rows_grad_atomic_kernel, dict(contrib, psw_ptr=f32, dest_ptr=f32),
                                  dict(HAS_PSW=False, DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
out["psw_grad"] = ptx_ops(pooled_bwd._psw_grad_kernel, dict(contrib, weights_ptr=f32, out_ptr=f32),
                          dict(DIM_ALIGN=align, BLOCK_D=64, BLOCK_Q=32))
print(json.dumps(out))
