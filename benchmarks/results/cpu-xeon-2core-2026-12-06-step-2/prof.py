"""Per-op profile of jaggedrec's fused train step (dlrm preset), one thread.

    python prof.py L OPTIMIZER [STEPS]
"""
import sys
import torch
from torch.profiler import profile, ProfilerActivity
import jaggedrec as jr
import jaggedrec.distributed.fused_params as fp

L, opt_name = int(sys.argv[1]), sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"]) for i in range(T)]
ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=fp.fused_optimizer_from_params(
    {"optimizer": opt_name.upper(), "learning_rate": 0.01}))
kjts = []
for s in range(3):
    g = torch.Generator().manual_seed(s)
    lengths = torch.full((T * B,), L)
    kjts.append(jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], torch.randint(0, R, (T * B * L,), generator=g),
                                     lengths=lengths))
grad = torch.randn(B, T * D)
for i in range(2):
    ebc(kjts[i % 3]).values().backward(grad)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for i in range(steps):
        ebc(kjts[i % 3]).values().backward(grad)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
