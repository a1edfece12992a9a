"""Machine code of every launchable variant of the short-bag forward (kernels/pooled_fwd_short.py)
for sm_90a: registers, spills, residency, round trips per loop iteration, row-load width.
Run from the checkout: TRITON_INTERPRET=0 python benchmarks/results/codegen-sm90a-2026-12-06-short-forward/read_short_forward.py > out.json"""
import os, sys, itertools, json
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import codegen_report as cr, sass, triton
from jaggedrec.kernels import pooled_fwd_short as pfs
types = dict(weights_ptr="*fp32", values_ptr="*i64", offsets_ptr="*i64", psw_ptr="*fp32", inverse_ptr="*i64",
             meta_ptr="*i64", out_ptr="*fp32", bad_ids_ptr="*i64", batch_size="i32", bag_stride="i32",
             out_stride="i32", num_features="i32")
rows = []
for cfg in pfs._configs():
    block, warps, per_sm = cfg.kwargs["BLOCK_B"], cfg.num_warps, cfg.kwargs["PROGRAMS_PER_SM"]
    for dt, dim, psw, short, inv, ids in itertools.product(["fp32", "fp16"], [64, 128], [False, True], [1, 2], [False, True], ["i64", "i32"]):
        if ids == "i32" and (dt != "fp32" or dim != 64):
            continue
        t = dict(types, weights_ptr="*" + dt, values_ptr="*" + ids, offsets_ptr="*" + ids)
        align = 4 if dt == "fp32" else 8
        consts = dict(HAS_PSW=psw, HAS_INVERSE=inv, BLOCK_D=dim, DIM_ALIGN=align, SHORT=short, BLOCK_B=block, PROGRAMS_PER_SM=per_sm)
        c = cr.compile_kernel(pfs._pooled_fwd_short_kernel, t, consts, warps)
        cubin = c.asm["cubin"]
        code = next(iter(sass.parse(sass.disassemble(cubin, cr.cuobjdump())).values()))
        res = cr.resources(cubin)
        occ = cr.occupancy(res["registers"], res["shared"], warps)
        loops = [(s, e) for s, e in sass.loops(code) if e - s > 10]
        tim = [sass.simulate(code, s, e) for s, e in loops]
        spill = sum(1 for i in code if i.base in ("STL", "LDL"))
        rows.append(dict(block=block, warps=warps, per_sm=per_sm, dtype=dt, dim=dim, ids=ids, psw=psw, short=short, inverse=inv,
                         registers=res["registers"], local=res["local"], spill_instructions=spill, blocks_per_sm=occ["blocks"],
                         round_trips=[x.round_trips for x in tim], row_load_bytes=[x.load_bytes for x in tim]))
print(json.dumps(dict(triton=triton.__version__, rows=rows)))
