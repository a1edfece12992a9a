"""Read every variant of the hash probe the library can launch (sm_90a, no GPU): buckets of 1 to 16,
the dims' tile widths and alignments, int64 and int32 ids, each built with the arguments of the
report's dlrm launch (launch_args) but for these constexprs. With OLD=path, that file's kernel
(the one before the pipeline, which takes no DIM_ALIGN nor WINDOW).

    python benchmarks/results/codegen-sm90a-2026-12-07-hash-probe/read_variants.py out.json
"""
import dataclasses
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import codegen_report as cr  # noqa: E402  (sets TRITON_INTERPRET=0)
import launch_args  # noqa: E402
import triton  # noqa: E402
from variants import Variant  # noqa: E402

from jaggedrec.kernels.common import block_d  # noqa: E402

OLD = os.environ.get("OLD")
if OLD:
    spec = importlib.util.spec_from_file_location("hash_probe_old", OLD)
    hash_probe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hash_probe
    spec.loader.exec_module(hash_probe)
else:
    from jaggedrec.kernels import hash_probe

# (dim, DIM_ALIGN as ops.hash_probe.probe_alignment gives it: 4 or 1)
DIMS = [(128, 4), (64, 4), (256, 4), (20, 4), (130, 1), (5, 1), (1, 1)]
out = []
for ids in ("int64", "int32"):
    recorded = launch_args.launches("fp32", 128, ids)["hash_probe.hash_probe_pooled_kernel"]
    for dim, align in DIMS:
        for bucket in (1, 2, 4, 8, 16):
            if ids == "int32" and bucket != 8:
                continue
            args = dict(recorded, BUCKET_SIZE=bucket, BLOCK_D=block_d(dim))
            if not OLD:
                args.update(DIM_ALIGN=align, WINDOW=max(bucket, 8))
            else:
                args.pop("DIM_ALIGN", None), args.pop("WINDOW", None)
            types, passed, divisible = launch_args.specialise(hash_probe.hash_probe_pooled_kernel, args)
            v = Variant("hash_probe", f"{ids} ids, dim {dim}, DIM_ALIGN={align if not OLD else '-'}, "
                        f"BUCKET_SIZE={bucket}", hash_probe.hash_probe_pooled_kernel, types, passed, 4, "probe", 4,
                        tuple(divisible))
            r = cr.read(v)
            out.append(dataclasses.asdict(r))
            print(f"{r.label:48s} regs {r.registers:3d}  stack {r.stack_bytes:3d}  spill st/ld {r.spill_store_bytes}/"
                  f"{r.spill_load_bytes}  loop spills {r.loop_spills}/{r.outer_loop_spills}  occ {100 * r.occupancy:.0f}%"
                  f"  widest ld {r.row_load_bytes} B  trips/it {r.round_trips:g}  prologue {r.prologue_round_trips}"
                  f"  decoder {'ok' if not r.unwaited else r.unwaited}", flush=True)
json.dump({"triton": triton.__version__, "old": OLD, "readings": out}, open(sys.argv[1], "w"), indent=1)
