"""Nested thread-CPU totals of one quantized forward, each measured in the runner's regime (after the
fp32 module, then TorchRec, then the loop), variants rotating turn by turn:
  full     = build the KJT + module(kjt)            (what the benchmark times)
  kjt      = build the KJT
  pooled   = host_path.pooled(...) on a fresh KJT   (checks + pooling + cat; no nn.Module, serves, plan lookup, KeyedTensor)
  forward  = quantized_forward(...) with the checked offsets and starts given (pooling + cat)
  calls    = the same per-key calls and cat, inlined (rows, ids, offsets precomputed): the op work itself
  loop     = the bare loop provider (slices, subs, calls, cat)"""
import sys, time, statistics, torch
torch.set_num_threads(1)
from collections import defaultdict
from jaggedrec.benchmarks.presets import preset_workloads
from jaggedrec.benchmarks.workload import make_batches, reference_tables
from jaggedrec.benchmarks.providers.quant import quant_providers
from jaggedrec.quant import host_path
from jaggedrec.ops import quantized_torch as qt
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8
dtype, turns = sys.argv[1], int(sys.argv[2])
w = preset_workloads("tutorial", "cpu")[0].replace(dtype=dtype)
tables = reference_tables(w, 0); batches = make_batches(w, 4, 0)
provs = quant_providers()
for p in provs: p.build(tables, w)
fp32, q, tr, loop = provs
mod = q.module; B = w.batch_size
T = time.thread_time_ns
st = mod._buffers
buffers = {STORAGE_INT8: st["qweights_int8"], STORAGE_INT4: st["qweights_int4"], STORAGE_FP16: st["qweights_fp16"]}
with torch.no_grad(): q.forward(batches[0])
plan = mod._plan_for(batches[0].jaggedrec_kjt(q.keys))
op = qt._OPS[STORAGE_INT8 if dtype == "int8" else STORAGE_INT4]
whole = qt.op_takes_unbased_offsets(STORAGE_INT8 if dtype == "int8" else STORAGE_INT4)
rows = [plan.rows(seg) for seg in qt._split(plan, [0, 1, 2])[0]]
def v_full(b): kjt = b.jaggedrec_kjt(q.keys); mod(kjt)
def v_kjt(b): b.jaggedrec_kjt(q.keys)
def v_pooled(b, kjt): host_path.pooled(kjt, mod._spec, plan, buffers, True, B)
def v_forward(b): qt.quantized_forward(buffers, b.values, b.offsets, None, plan.tables, b.key_offsets, True, False, plan)
def v_calls(b):
    v, o, s = b.values, b.offsets, b.key_offsets
    pieces = []
    for k in range(2):
        own = o[k * B:(k + 1) * B + 1]
        if whole: pieces.append(op(rows[k], v, own, False, 0, False, None, None, True))
        elif k == 0: pieces.append(op(rows[k], v[:s[1]], own, False, 0, False, None, None, True))
        else: pieces.append(op(rows[k], v[s[k]:s[k + 1]], own - s[k], False, 0, False, None, None, True))
    torch.cat(pieces, dim=1)
rec = defaultdict(list)
names = ["full", "kjt", "pooled", "forward", "calls"]
with torch.no_grad():
    for i in range(turns * len(names)):
        b = batches[i % 4]; name = names[i % len(names)]
        kjt = b.jaggedrec_kjt(q.keys) if name == "pooled" else None
        fp32.forward(b)
        t0 = T()
        if name == "pooled": v_pooled(b, kjt)
        else: globals()["v_" + name](b)
        rec[name].append((T() - t0) / 1e3)
        tr.forward(b)
        t0 = T(); loop.forward(b); rec["loop"].append((T() - t0) / 1e3)
m = {k: statistics.median(v) for k, v in rec.items()}
for k in names + ["loop"]: print(f"  {k:8s} {m[k]:7.1f} us")
print(f"  wrapper (full - kjt - pooled) {m['full'] - m['kjt'] - m['pooled']:.1f}; checks+starts (pooled - forward) {m['pooled'] - m['forward']:.1f}; "
      f"glue (forward - calls) {m['forward'] - m['calls']:.1f}; loop/full {m['loop'] / m['full']:.3f}")
