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


def _flat_sizes(model):
    """Element counts of every flat weight and fused-state tensor, and of every table in them."""
    sizes = {t.numel() for t in model.flat_weights.values()}
    sizes |= {v.numel() for v in model.fused_optimizer_state.state_dict().values() if v.dim() == 1}
    return sizes | {model.table_weight(t).numel() for t in range(len(model.layout.configs))}


def test_inductor_training_writes_in_place_and_equals_eager():
    """Inductor (CPU), not only AOTAutograd: the compiled step's C++ runs, gives the eager rows and
    tables over batches that evict, and re-initialises evicted rows in place: none of the
    graph spans a whole flat tensor or table (writes through a table's narrowed view used to copy
    the flat weights every step, and an int64 hash product overflowing in C++ made a bounds check
    fail on valid indices with torch 2.13)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    dims, rows = (16, 16, 8), 251
    configs = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=rows, feature_names=[f"f{i}"])
               for i, d in enumerate(dims)]
    options = {c.name: HashTableOptions(bucket_size=8, eviction="lru", unplaced="fallback") for c in configs}
    fused = optim.RowWiseAdagrad(lr=0.05)
    eager = HashEmbeddingBagCollection(configs, options, backend="torch", fused_optimizer=fused)
    compiled = HashEmbeddingBagCollection(configs, options, backend="torch", fused_optimizer=fused)
    compiled.load_state_dict(eager.state_dict())
    compiled.reset_seed = eager.reset_seed
    loss = torch.compile(lambda kjt: compiled(kjt).values().square().sum(), fullgraph=True)
    rng = random.Random(3)
    pool = [rng.randrange(-2**63, 2**63) for _ in range(10 * rows)]
    codes, evictions = [], 0
    for i in range(4):
        lengths = [rng.choice(range(17)) for _ in range(len(dims) * 64)]
        values = [rng.choice(pool[:rows // 2]) if rng.random() < 0.5 else rng.choice(pool) for _ in range(sum(lengths))]
        kjt = jr.KeyedJaggedTensor([c.feature_names[0] for c in configs], torch.tensor(values),
                                   lengths=torch.tensor(lengths))
        before = compiled.hash_state.keys.clone()
        if i == 0:
            codes = run_and_get_code(lambda kjt=kjt: loss(kjt).backward())[1]
        else:
            loss(kjt).backward()
        eager(kjt).values().square().sum().backward()
        evictions += int(((before != compiled.hash_state.keys) & (before != before.min())).sum())
        assert torch.equal(eager.hash_state.keys, compiled.hash_state.keys), i
    assert evictions > 100
    for k, v in eager.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(compiled.state_dict()[k], v)
        else:
            assert torch.equal(compiled.state_dict()[k], v), k
    assert len(codes) == 2  # forward, backward
    for size in _flat_sizes(compiled):  # the forward's (the backward copies its weights back whole: not yet)
        assert f"<static_cast<int64_t>({size}L)" not in codes[0], size


def test_wrapping_mul_is_the_int64_product_modulo_2_64():
    """Compiled graphs hash with ``wrapping_mul`` (no int64 product overflows): Python's ints
    say what ``x * m`` modulo 2^64 is, read as int64."""
    from jaggedrec.ops import hash_probe_torch as hp

    rng = random.Random(11)
    xs = [rng.randrange(-2**63, 2**63) for _ in range(2000)] + [0, 1, -1, 2**63 - 1, -2**63, 2**32 - 1, 2**32, -2**32]
    for m in (-4658895280553007687, -7723592293110705685, 3, -1, 2**63 - 1, -2**63, 0xFFFF0000FFFF):
        got = hp.wrapping_mul(torch.tensor(xs), m).tolist()
        want = [((x * m + 2**63) % 2**64) - 2**63 for x in xs]
        assert got == want, m
