import sys, time, statistics, collections, torch

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
import os, torch._inductor.config as icfg
if os.environ.get("NOREUSE"): icfg.allow_buffer_reuse = False
ch = torch.compile(hashed, fullgraph=True)
def step(m, k): m(k).values().sum().backward()
t0 = time.time()
for r in range(4):
    print("warm", r, flush=True); step(ch, batches[r][0])
print("compile s", time.time() - t0, flush=True)
from torch._inductor.codecache import PyCodeCache
tot = collections.Counter(); calls = collections.Counter()
def wrap(mod, name, fn):
    def w(*a, **k):
        t = time.thread_time(); r = fn(*a, **k); tot[(mod.__file__[-12:], name)] += time.thread_time() - t; calls[(mod.__file__[-12:], name)] += 1; return r
    return w
for mod in list(PyCodeCache.modules):
    g = mod.Runner.call.__globals__ if hasattr(mod, "Runner") else vars(mod)
    print("same", g is vars(mod))
    for name in list(g):
        if name.startswith("cpp_fused") or name.startswith("cpp_"):
            g[name] = wrap(mod, name, g[name])
    print(mod.__file__)
res = []
for r in range(8):
    t = time.thread_time(); step(ch, batches[r % 4][0]); res.append(time.thread_time() - t)
print("step ms", statistics.median(res) * 1000)
for k, v in tot.most_common(25):
    print(f"{v / 8 * 1000:8.2f} ms/step  {calls[k]//8} {k[0]} {k[1][:200]}")
