"""Hash tables beside static ones and under torch.compile: with room for every id and no
eviction, a HashEmbeddingBagCollection's output and training equal, bit for bit, an
EmbeddingBagCollection fed the rows the simulator (tests/hash_table_sim.py) gives; compiled
(fullgraph), 100 training batches of varying size that insert and evict make one graph with no
break and the eager module's rows and tables."""

import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

from hash_table_sim import SimTable, Simulator

KEYS = ["a", "b", "c"]  # a, b: table h; c: static table s
B = 4


def tables():
    return [jr.EmbeddingBagConfig(name="h", embedding_dim=6, num_embeddings=65, feature_names=["a", "b"]),
            jr.EmbeddingBagConfig(name="s", embedding_dim=3, num_embeddings=9, feature_names=["c"],
                                  pooling=jr.PoolingType.MEAN)]


def batch(rng, pool, id_dtype):
    lengths, values, hashed = [], [], []
    for k in KEYS:
        for _ in range(B):
            n = 0 if k == "b" and rng.random() < 0.3 else rng.choice([0, 1, 2, 3])
            lengths.append(n)
            values += [rng.randrange(9) if k == "c" else rng.choice(pool) for _ in range(n)]
            hashed += [k != "c"] * n
    kjt = jr.KeyedJaggedTensor(KEYS, torch.tensor(values, dtype=id_dtype), lengths=torch.tensor(lengths))
    return kjt, [("h" if h else None, v) for h, v in zip(hashed, values)]


@pytest.mark.parametrize("fused", [None, optim.RowWiseAdagrad(lr=0.05), optim.Adam(lr=0.01)],
                         ids=["dense", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_equals_static_collection_fed_the_rows(fused, id_dtype):
    options = HashTableOptions(bucket_size=8, eviction="none")
    rng = random.Random(11)
    pool = [rng.randrange(-2**31, 2**31) for _ in range(20)]  # 20 ids, 64 slots: every id placed
    hashed = HashEmbeddingBagCollection(tables(), {"h": options}, backend="torch", fused_optimizer=fused)
    static = jr.EmbeddingBagCollection(tables(), backend="torch", fused_optimizer=fused)
    static.load_state_dict({k: v for k, v in hashed.state_dict().items() if not k.startswith("hash_state.")})
    sim = Simulator({"h": SimTable(65, 8, "none")})
    dense = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (hashed, static)] if fused is None else []
    for _ in range(8):
        kjt, positions = batch(rng, pool, id_dtype)
        rows, _, _ = sim.batch(positions)
        remapped = jr.KeyedJaggedTensor(KEYS, torch.tensor([v if r is None else r for (_, v), r in
                                                            zip(positions, rows)], dtype=id_dtype),
                                        lengths=kjt.lengths())
        out_h, out_s = hashed(kjt).values(), static(remapped).values()
        assert torch.equal(out_h, out_s)
        for out in (out_h, out_s):
            out.mul(torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        for o in dense:
            o.step()
            o.zero_grad()
    for k, v in static.state_dict().items():
        assert torch.equal(hashed.state_dict()[k], v), k


def test_compiled_training_one_graph_over_evictions():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    options = {"h": HashTableOptions(bucket_size=4, eviction="lru", admit_threshold=2, sketch_width=50,
                                     unplaced="fallback")}
    fused = optim.RowWiseAdagrad(lr=0.05)
    eager = HashEmbeddingBagCollection(tables(), options, backend="torch", fused_optimizer=fused)
    compiled = HashEmbeddingBagCollection(tables(), options, backend="torch", fused_optimizer=fused)
    compiled.load_state_dict(eager.state_dict())
    # evicted rows' fresh values are keyed by (seed, step, table, row): the eager module, which
    # compacts (nonzero), and the graph, on fixed shapes, give them the same values
    compiled.reset_seed = eager.reset_seed
    counter = CompileCounterWithBackend("aot_eager")  # the backward through AOTAutograd
    loss = torch.compile(lambda kjt: compiled(kjt).values().square().sum(), backend=counter, fullgraph=True)
    rng = random.Random(5)
    pool = [rng.randrange(2**62) for _ in range(200)]  # 200 ids, 64 slots: evictions every batch
    evictions = 0
    for i in range(100):
        kjt, _ = batch(rng, pool, torch.int64)  # ids a batch vary: one graph still
        before = compiled.hash_state.keys.clone()
        loss(kjt).backward()
        eager(kjt).values().square().sum().backward()
        evictions += int(((before != compiled.hash_state.keys) & (before != before.min())).sum())
        if i % 10 == 0 or i == 99:
            assert torch.equal(eager.hash_state.keys, compiled.hash_state.keys), i
    assert evictions > 50
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert counter.frame_count == 1
    for k, v in eager.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(compiled.state_dict()[k], v)
        else:
            assert torch.equal(compiled.state_dict()[k], v), k
