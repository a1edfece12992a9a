"""Interleaved thread-CPU medians: fp32, quant, torchrec, loop, one step each per turn (as the runner)."""
import sys, time, statistics, torch
torch.set_num_threads(1)
import jaggedrec
from jaggedrec.benchmarks.presets import preset_workloads
from jaggedrec.benchmarks.workload import make_batches, reference_tables
from jaggedrec.benchmarks.providers.quant import quant_providers
preset, dtype, turns = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = dict(a.split("=") for a in sys.argv[4:])
w = preset_workloads(preset, "cpu")[0].replace(dtype=dtype, **{k: float(v) for k, v in extra.items()})
tables = reference_tables(w, 0); batches = make_batches(w, 4, 0)
provs = quant_providers()
for p in provs: p.build(tables, w)
T = time.thread_time_ns
rec = {p.name: [] for p in provs}
with torch.no_grad():
    for p in provs:
        for b in batches: p.forward(b)
    for i in range(turns):
        b = batches[i % 4]
        for p in provs:
            t0 = T(); p.forward(b); rec[p.name].append((T() - t0) / 1e3)
m = {k: statistics.median(v) for k, v in rec.items()}
q = m["jaggedrec_quant"]
print(f"{jaggedrec.__file__.split('/jaggedrec/')[0]:14s} {preset} {dtype} {extra} quant {q:8.1f} us  loop {m['torch_ops_loop']:8.1f} ({m['torch_ops_loop']/q:.3f}x)  torchrec {m['torchrec_quant']:8.1f} ({m['torchrec_quant']/q:.3f}x)")
