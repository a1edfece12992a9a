import time, statistics, torch
torch.set_num_threads(1)
from jaggedrec.benchmarks.presets import preset_workloads
from jaggedrec.benchmarks.workload import make_batches, reference_tables
from jaggedrec.benchmarks.providers.quant import quant_providers
from jaggedrec.quant import host_path
from jaggedrec.ops import quantized_torch as qt
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8
w = preset_workloads("dlrm", "cpu")[0].replace(dtype="int8", pooling_factor=20.0)
tables = reference_tables(w, 0); batches = make_batches(w, 2, 0)
provs = quant_providers(); q, loop = provs[1], provs[3]
for p in (q, loop): p.build(tables, w)
mod = q.module; B = w.batch_size
rows = [mod.table_rows(t).detach() for t in range(26)]
op = qt._OPS[STORAGE_INT8]
st = mod._buffers
buffers = {STORAGE_INT8: st["qweights_int8"], STORAGE_INT4: st["qweights_int4"], STORAGE_FP16: st["qweights_fp16"]}
def calls(b):
    torch.cat([op(rows[t], b.values, b.offsets[t*B:(t+1)*B+1], False, 0, False, None, None, True) for t in range(26)], dim=1)
def checks(b):
    kjt = b.jaggedrec_kjt(q.keys); host_path._offsets(kjt, mod._spec, True, B)
def qforward(b):
    plan = mod._plan_for(b.jaggedrec_kjt(q.keys))
    qt.quantized_forward(buffers, b.values, b.offsets, None, plan.tables, b.key_offsets, True, False, plan)
V = {"module": q.forward, "loop": loop.forward, "calls+cat": calls, "checks": checks, "quantized_forward": qforward}
rec = {k: [] for k in V}
T = time.thread_time_ns
with torch.no_grad():
    for i in range(12):
        b = batches[i % 2]
        for k, f in V.items():
            t0 = T(); f(b); rec[k].append((T() - t0) / 1e6)
for k, v in rec.items(): print(f"{k:18s} {statistics.median(v):7.2f} ms")
