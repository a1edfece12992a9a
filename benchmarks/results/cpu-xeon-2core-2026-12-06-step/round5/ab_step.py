# A/B of the fifth session's two changes in one process, alternating, on the same batches:
# "old" restores index_copy_ write-back and the one whole sort by monkeypatching fused_rows.
# usage: python ab_step.py IDS_PER_BAG sgd|adagrad|rw REPEATS [THREADS]
import sys, time, statistics, torch
import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.ops import fused_rows
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
L = int(sys.argv[1]); opt = sys.argv[2]; reps = int(sys.argv[3])
T, R, D, B = 26, 100_000, 64, 4096
cfgs = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
mk = {"sgd": lambda: optim.SGD(lr=0.01), "adagrad": lambda: optim.Adagrad(lr=0.01, eps=1e-8), "rw": lambda: optim.RowWiseAdagrad(lr=0.01, eps=1e-8)}[opt]
torch.manual_seed(0)
ebcs = {k: jr.EmbeddingBagCollection(tables=cfgs, fused_optimizer=mk()) for k in ("old", "new")}
ebcs["new"].load_state_dict(ebcs["old"].state_dict())
g = torch.Generator().manual_seed(0)
def batch():
    v = torch.randint(0, R, (T * B * L,), generator=g)
    return jr.KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(T)], v, torch.full((T * B,), L))
bs = [batch() for _ in range(3)]
up = torch.randn(B, T * D)
new_copy = fused_rows.copy_rows
old_copy = lambda d, r, v: d.index_copy_(0, r, v)
def use(k):
    fused_rows.copy_rows = old_copy if k == "old" else new_copy
res = {k: [] for k in ebcs}
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
for i in range(reps):
    for k, ebc in ebcs.items():
        use(k)
        t0 = clock(); ebc(bs[i % 3]).values().backward(up); res[k].append(clock() - t0)
for k in res: print(k, opt, "L", L, round(statistics.median(res[k][1:]) * 1e3, 2), "ms/step (loaded)", [round(x * 1e3) for x in res[k]])
sd = [e.state_dict() for e in ebcs.values()]
print("same bits", all(torch.equal(v, sd[1][k]) for k, v in sd[0].items()), len(sd[0]))
