"""jaggedrec fused SGD vs FBGEMM EXACT_SGD vs sparse nn.EmbeddingBag loop + SGD: train step,
dlrm 26x100k x64, B 4096, L ids/bag; quiet then beside one busy process; providers alternate
within each round, 3 batches rotate; medians."""
import sys, time, subprocess, torch, statistics
import jaggedrec as jr
from jaggedrec import optim
T, R, D, B = 26, 100_000, 64, 4096
L = int(sys.argv[1]); threads = int(sys.argv[2]); reps = int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
tables = [torch.empty(R, D).uniform_(-0.01, 0.01) for _ in range(T)]
cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=optim.SGD(0.01))
ebc.load_state_dict({f"embedding_bags.t{i}.weight": t for i, t in enumerate(tables)}, strict=False)
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
tbe = SplitTableBatchedEmbeddingBagsCodegen([(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
    optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.01, weights_precision=SparseType.FP32,
    output_dtype=SparseType.FP32, pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
loop = torch.nn.ModuleList([torch.nn.EmbeddingBag(R, D, mode="sum", sparse=True) for _ in range(T)])
for m, t in zip(loop, tables): m.weight.data.copy_(t)
sgd = torch.optim.SGD(loop.parameters(), lr=0.01)
def batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((T * B,), L)
    values = torch.randint(0, R, (T * B * L,), generator=g)
    return values, lengths, torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
batches = [batch(s) for s in range(3)]
kjts = [jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], v, lengths=l) for v, l, _ in batches]
grad = torch.randn(B, T * D)
def jr_step(i): ebc(kjts[i % 3]).values().backward(grad)
def fb_step(i): v, l, o = batches[i % 3]; tbe(v, o).backward(grad)
def loop_step(i):
    v, l, o = batches[i % 3]
    sgd.zero_grad(set_to_none=True)
    per = B * L
    out = torch.cat([m(v[t * per:(t + 1) * per], o[t * B:(t + 1) * B] - t * per) for t, m in enumerate(loop)], 1)
    out.backward(grad); sgd.step()
provs = [("jaggedrec", jr_step), ("fbgemm", fb_step), ("loop", loop_step)]
for name, f in provs: f(0)
def measure(busy):
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.3)
        res = {n: [] for n, _ in provs}
        for i in range(reps):
            order = provs[i % 3:] + provs[:i % 3]
            for name, f in order:
                t = time.perf_counter(); f(i); res[name].append(1000 * (time.perf_counter() - t))
        return {k: statistics.median(v) for k, v in res.items()}
    finally:
        if proc: proc.kill()
for busy in (False, True):
    r = measure(busy)
    print(f"L={L} threads={threads} {'contended' if busy else 'quiet    '}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in r.items())
          + f"; fbgemm/jaggedrec {r['fbgemm']/r['jaggedrec']:.2f}, loop/jaggedrec {r['loop']/r['jaggedrec']:.2f}", flush=True)
