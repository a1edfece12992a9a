"""The runner's interleaved order (forward on even turns, reversed on odd): each provider's samples split by the provider that ran just before."""
import sys, time, statistics, torch
torch.set_num_threads(1)
from collections import defaultdict
from jaggedrec.benchmarks.presets import preset_workloads
from jaggedrec.benchmarks.workload import make_batches, reference_tables
from jaggedrec.benchmarks.providers.quant import quant_providers
from jaggedrec.benchmarks.timing import interleaved_order
preset, dtype, turns = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = dict(a.split("=") for a in sys.argv[4:])
w = preset_workloads(preset, "cpu")[0].replace(dtype=dtype, **{k: float(v) for k, v in extra.items()})
tables = reference_tables(w, 0); batches = make_batches(w, 4, 0)
provs = quant_providers()
for p in provs: p.build(tables, w)
rec = defaultdict(list); allp = defaultdict(list)
prev = "-"; count = [0] * 4
with torch.no_grad():
    for i in interleaved_order(4, turns):
        p = provs[i]; b = batches[count[i] % 4]; count[i] += 1
        t0 = time.perf_counter(); p.forward(b); dt = (time.perf_counter() - t0) * 1e6
        rec[(p.name, prev)].append(dt); allp[p.name].append(dt); prev = p.name
for (n, pr), v in sorted(rec.items()): print(f"{n:16s} after {str(pr):16s} {statistics.median(v):9.1f} us  n={len(v)}")
m = {n: statistics.median(v) for n, v in allp.items()}
print("all samples: loop/quant %.3f  torchrec/quant %.3f" % (m["torch_ops_loop"] / m["jaggedrec_quant"], m["torchrec_quant"] / m["jaggedrec_quant"]))
