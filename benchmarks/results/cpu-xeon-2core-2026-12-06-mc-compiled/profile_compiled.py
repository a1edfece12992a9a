"""Profile of 4 compiled hashed train steps (Inductor kernels named: cpp.enable_kernel_profile)."""
import sys, time, statistics, torch

torch.set_num_threads(1)
from jaggedrec import optim
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.benchmarks.providers import mc
w = dict(tables=4, num_embeddings=100000, dim=64, batch_size=2048, pooling_factor=8, id_space=10.0)
keys, batches = mc._batches(w, 4, 0, "cpu")
opts = {f"t{t}": HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(4)}
import torch._inductor.config as icfg
hashed = HashEmbeddingBagCollection(mc._configs(w), opts, backend="torch", fused_optimizer=optim.RowWiseAdagrad(lr=0.01))
icfg.cpp.enable_kernel_profile = True
ch = torch.compile(hashed, fullgraph=True)
def step(m, k): m(k).values().sum().backward()
for r in range(6): step(ch, batches[r % 4][0])
from torch.profiler import profile
with profile() as p:
    for r in range(4): step(ch, batches[r][0])
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
    if e.key.startswith("graph_"):
        print(f"{e.self_cpu_time_total / 4000:7.2f} ms/step  {e.key}")
