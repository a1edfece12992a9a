"""The lead's script (issue 26), its enable_kernel_profile line removed: compiled and eager, hashed
and static, one thread, medians of 40 steps, then a profile of 4 compiled hashed steps."""
import sys, time, statistics, torch

torch.set_num_threads(1)
import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.benchmarks.providers import mc
w = dict(tables=4, num_embeddings=100000, dim=64, batch_size=2048, pooling_factor=8, id_space=10.0)
keys, batches = mc._batches(w, 4, 0, "cpu")
opts = {f"t{t}": HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(4)}
fused = optim.RowWiseAdagrad(lr=0.01)
hashed = HashEmbeddingBagCollection(mc._configs(w), opts, backend="torch", fused_optimizer=fused)
static = jr.EmbeddingBagCollection(mc._configs(w), backend="torch", fused_optimizer=fused)
backend = sys.argv[1] if len(sys.argv) > 1 else "inductor"

ch = torch.compile(hashed, fullgraph=True, backend=backend)
cs = torch.compile(static, fullgraph=True, backend=backend)
def step(m, k): m(k).values().sum().backward()
t0=time.time()
for r in range(8):
    raw, st = batches[r % 4]; step(ch, raw); step(cs, st)
print("warm/compile s", time.time()-t0, flush=True)
res = {k: [] for k in ("hash_c", "static_c", "hash_e", "static_e")}
for r in range(40):
    raw, st = batches[r % 4]
    for name, m, k in (("hash_c", ch, raw), ("static_c", cs, st), ("hash_e", hashed, raw), ("static_e", static, st)):
        t = time.thread_time(); step(m, k); res[name].append(time.thread_time() - t)
med = {k: statistics.median(v) * 1000 for k, v in res.items()}
print(backend, {k: round(v, 2) for k, v in med.items()}, "compiled ratio", round(med["hash_c"] / med["static_c"], 3),
      "eager ratio", round(med["hash_e"] / med["static_e"], 3), "load", open("/proc/loadavg").read().split()[0])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for r in range(4):
        raw, st = batches[r % 4]; step(ch, raw)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
