"""The compiled-remap crash of issue 26 (torch 2.13, GCC -O3): HashEmbeddingBagCollection.remap alone,
fixed shapes (eager_compaction off), compiled with Inductor at the bench size, then compiled against eager
(thread CPU ms, medians of 10). argv[1]: "remap" (with the reset of evicted rows) or "state" (the id map only).
Before 17feb46: RuntimeError index out of bounds in the reset loop; after: runs."""
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
hashed.hash_state.eager_compaction = False
which = sys.argv[1]
st = hashed.hash_state
if which == "state":
    f = lambda k: st.remap(k)
elif which == "remap":
    f = lambda k: hashed.remap(k)
fc = torch.compile(f, fullgraph=True)
t0 = time.time()
for r in range(4): fc(batches[r][0])
print("compile s", time.time() - t0, flush=True)
res = {"c": [], "e": []}
for r in range(10):
    raw = batches[r % 4][0]
    for name, g in (("c", fc), ("e", f)):
        t = time.thread_time(); g(raw); res[name].append(time.thread_time() - t)
print(which, {k: round(statistics.median(v) * 1000, 2) for k, v in res.items()}, open("/proc/loadavg").read().split()[0])
