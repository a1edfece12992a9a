"""The fixed cost of a remap: HashEmbeddingBagCollection.remap (training) of 32 new ids over the
mc preset's 4 tables against the same remap of the preset's 65k-id batches, after 3 warm-up
train steps. One thread, thread CPU time, medians.

    python fixed_cost.py
"""
import time, statistics, torch
import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.benchmarks.providers import mc
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
torch.set_num_threads(1)
args = mc._parser().parse_args(["--module", "mc"]); w = mc._workload(args)
torch.manual_seed(0)
_, batches = mc._batches(w, 4, 0, "cpu")
options = {f"t{t}": HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for t in range(w["tables"])}
h = HashEmbeddingBagCollection(mc._configs(w), options, backend="torch", fused_optimizer=optim.RowWiseAdagrad(lr=0.01))
for _ in range(3):
    for raw,_ in batches: h(raw).values().sum().backward()
g = torch.Generator().manual_seed(1)
small = [jr.KeyedJaggedTensor([f"f{t}" for t in range(4)], torch.randint(-2**62, 2**62, (32,), generator=g), lengths=torch.full((16,), 2)) for _ in range(50)]
T=[]; R=[]
for k in small:
    t0=time.thread_time(); h.remap(k); T.append(time.thread_time()-t0)
for _ in range(5):
  for raw,_ in batches:
    t0=time.thread_time(); h.remap(raw); R.append(time.thread_time()-t0)
print("tiny remap (32 new ids) ms", statistics.median(T)*1e3, " full remap ms", statistics.median(R)*1e3)
