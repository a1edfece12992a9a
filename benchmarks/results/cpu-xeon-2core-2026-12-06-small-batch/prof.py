"""One process, the providers of a preset timed round-robin (each sample of one provider then the next),
medians of wall and thread CPU time: what a loaded machine allows. See abproc.sh."""
import sys, time, statistics, argparse
import torch
from jaggedrec.benchmarks.presets import preset_workloads
from jaggedrec.benchmarks.runner import reference_tables
from jaggedrec.benchmarks.workload import make_batches
from jaggedrec.benchmarks.providers import all_providers

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="tutorial")
ap.add_argument("--mode", default="forward")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--providers", default="eb_loop,jaggedrec[torch],torchrec_ebc")
ap.add_argument("--reps", type=int, default=400)
ap.add_argument("--batches", type=int, default=4)
a = ap.parse_args()
torch.set_num_threads(a.threads)
w = preset_workloads(a.preset, "cpu")[0].replace(mode=a.mode)
tables = reference_tables(w, 0)
batches = make_batches(w, a.batches, 0)
names = a.providers.split(",")
ps = [p for p in all_providers() if p.name in names]
for p in ps:
    p.build(tables, w)
for p in ps:
    for i in range(min(20, max(3, a.reps // 5))):
        p.step(batches[i % len(batches)])
wall = {p.name: [] for p in ps}
cpu = {p.name: [] for p in ps}
for r in range(a.reps):
    for j in range(len(ps)):
        p = ps[(j + r) % len(ps)]
        b = batches[r % len(batches)]
        t0 = time.perf_counter_ns(); c0 = time.thread_time_ns()
        p.step(b)
        c1 = time.thread_time_ns(); t1 = time.perf_counter_ns()
        wall[p.name].append((t1 - t0) / 1e3); cpu[p.name].append((c1 - c0) / 1e3)
for p in ps:
    print(f"{p.name:20s} wall med {statistics.median(wall[p.name]):8.1f} us  p20 {sorted(wall[p.name])[len(wall[p.name])//5]:8.1f}  thread-cpu med {statistics.median(cpu[p.name]):8.1f} us")
