"""Hash tables (jaggedrec.modules.hash_embedding_modules) against the plain-Python simulator
(tests/hash_table_sim.py): the rows every id reads, batch after batch, the evictions (which
row, which id, in the simulator's order), admission at its threshold, the counts of unplaced
and fallback ids, and the reset of an evicted row and its fused optimizer state."""

import random

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

from hash_table_sim import EMPTY, SimTable, Simulator

KEYS = ["a", "b", "c", "d"]  # a, b: table h0; c: table h1; d: static table s
B = 3


def make(options0, options1, fused=None, dtype=torch.float32, rows1=10):
    tables = [jr.EmbeddingBagConfig(name="h0", embedding_dim=4, num_embeddings=13, feature_names=["a", "b"]),
              jr.EmbeddingBagConfig(name="s", embedding_dim=3, num_embeddings=7, feature_names=["d"]),
              jr.EmbeddingBagConfig(name="h1", embedding_dim=5, num_embeddings=rows1, feature_names=["c"])]
    return HashEmbeddingBagCollection(tables, {"h0": options0, "h1": options1}, backend="torch",
                                      fused_optimizer=fused)


def sim_for(options0, options1, rows1=10):
    def table(rows, o):
        return SimTable(rows, o.bucket_size, o.eviction, o.ttl, o.admit_threshold, o.sketch_width)
    return Simulator({"h0": table(13, options0), "h1": table(rows1, options1)})


def batch(rng, pool, id_dtype):
    """A KJT of KEYS with random bag sizes (empty bags; key 'b' sometimes has no ids at all),
    ids drawn from ``pool`` (duplicates) and a static key 'd' with ids in [0, 7)."""
    lengths, values, tables = [], [], []
    empty_b = rng.random() < 0.3
    for k in KEYS:
        for _ in range(B):
            n = 0 if (k == "b" and empty_b) else rng.choice([0, 1, 2, 3, 4])
            lengths.append(n)
            for _ in range(n):
                if k == "d":
                    values.append(rng.randrange(7))
                    tables.append(None)
                else:
                    values.append(rng.choice(pool))
                    tables.append("h0" if k in "ab" else "h1")
    kjt = jr.KeyedJaggedTensor(KEYS, torch.tensor(values, dtype=id_dtype), lengths=torch.tensor(lengths))
    return kjt, list(zip(tables, values))


def check_state(model, sim):
    """No two live ids share a row, and the live ids sit where the simulator has them."""
    for h, name in enumerate(["h0", "h1"]):
        keys = model.hash_state.live_ids(h).tolist()
        live = {k: r for r, k in enumerate(keys) if k != EMPTY}
        assert len(live) == sum(k != EMPTY for k in keys)  # ids unique
        assert live == sim.tables[name].live(), name


POLICIES = [HashTableOptions(bucket_size=3, eviction="lru", unplaced="fallback"),
            HashTableOptions(bucket_size=3, eviction="lfu", unplaced="fallback"),
            HashTableOptions(bucket_size=3, eviction="ttl", ttl=2, unplaced="fallback"),
            HashTableOptions(bucket_size=3, eviction="none", unplaced="fallback"),
            HashTableOptions(bucket_size=3, eviction="lru", admit_threshold=3, sketch_width=5, unplaced="fallback"),
            HashTableOptions(bucket_size=3, eviction="lfu", admit_threshold=2, unplaced="fallback")]


@pytest.mark.parametrize("compaction", [True, False], ids=["compact", "fixed_shapes"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("policy", range(len(POLICIES)))
def test_rows_and_evictions_match_simulator(policy, id_dtype, compaction):
    options1 = HashTableOptions(bucket_size=3, eviction="lfu" if policy % 2 else "lru", unplaced="fallback")
    _match_simulator(POLICIES[policy], options1, id_dtype, compaction, policy * 7 + (id_dtype == torch.int32))


@pytest.mark.parametrize("compaction", [True, False], ids=["compact", "fixed_shapes"])
@pytest.mark.parametrize("eviction1", ["lru", "ttl"])
def test_tables_of_one_bucket_count_match_simulator(eviction1, compaction):
    """Both hashed tables with 4 buckets (the remap's one-divisor path; the static key's
    positions take some bucket of h0 and must stay untouched), LRU alone or beside TTL."""
    options1 = HashTableOptions(bucket_size=3, eviction=eviction1, ttl=1, unplaced="fallback")
    _match_simulator(POLICIES[0], options1, torch.int64, compaction, 101 + (eviction1 == "ttl"), rows1=13)


def _match_simulator(options0, options1, id_dtype, compaction, seed, rows1=10):
    rng = random.Random(seed)
    model, sim = make(options0, options1, rows1=rows1), sim_for(options0, options1, rows1)
    model.hash_state.eager_compaction = compaction  # eager CPU picks the positions to place; graphs do not
    high = 2**31 - 1 if id_dtype == torch.int32 else 2**62
    pool = [rng.randrange(-high, high) for _ in range(30)]
    unplaced = {f: 0 for f in "abc"}
    fallback = dict(unplaced)
    saw_eviction = saw_pending = False
    for step in range(14):
        training = step % 5 != 4
        model.train(training)
        kjt, positions = batch(rng, pool, id_dtype)
        out = model.remap(kjt)
        assert out.values().dtype == id_dtype
        rows, evictions, flags = sim.batch(positions, training)
        got = out.values().tolist()
        want = [v if r is None else r for (_, v), r in zip(positions, rows)]
        assert got == want, step
        check_state(model, sim)
        saw_eviction |= bool(evictions)
        feats = [k for k, n in zip([k for k in KEYS for _ in range(B)], out.lengths().tolist()) for _ in range(n)]
        for f, (name, _), flag, r in zip(feats, positions, flags, rows):
            if name is None:
                continue
            unplaced[f] += flag == "unplaced"
            fallback[f] += r == sim.tables[name].num_embeddings - 1
            saw_pending |= flag == "pending"
        assert {f: int(n) for f, n in model.unplaced_counts().items()} == unplaced
        assert {f: int(n) for f, n in model.fallback_counts().items()} == fallback
    assert saw_eviction or options0.eviction == "none"
    assert saw_pending == (options0.admit_threshold > 1)


def test_admission_threshold_counts_occurrences():
    options = HashTableOptions(bucket_size=4, admit_threshold=3, sketch_width=1000, unplaced="fallback")
    model = make(options, options)
    fallback = 12
    for seen, want in [(1, fallback), (1, fallback), (1, None)]:
        kjt = jr.KeyedJaggedTensor(KEYS, torch.tensor([99] * seen), lengths=torch.tensor([seen] + [0] * 11))
        row = model.remap(kjt).values().tolist()[0]
        assert (row == fallback) == (want == fallback)
    # two occurrences in one batch count twice
    kjt = jr.KeyedJaggedTensor(KEYS, torch.tensor([7, 7, 7]), lengths=torch.tensor([3] + [0] * 11))
    assert model.remap(kjt).values().tolist() == [model.remap(kjt).values().tolist()[0]] * 3
    assert model.remap(kjt).values().tolist()[0] != fallback


def test_id_keeps_row_until_evicted():
    options = HashTableOptions(bucket_size=2, eviction="lru", unplaced="fallback")
    model = make(options, options)
    rng = random.Random(3)
    rows = {}
    for _ in range(30):
        ids = [rng.randrange(50) for _ in range(4)]
        kjt = jr.KeyedJaggedTensor(KEYS, torch.tensor(ids), lengths=torch.tensor([4] + [0] * 11))
        got = model.remap(kjt).values().tolist()
        live = {k: r for r, k in enumerate(model.hash_state.live_ids(0).tolist()) if k != EMPTY}
        for i, r in zip(ids, got):
            if i in rows and rows[i] in live.values() and live.get(i) == rows[i]:
                assert r == rows[i]
            if r != 12:
                rows[i] = r
        # an id no longer live was evicted: its old row now holds another id (or it kept its row)
        for i, r in rows.items():
            assert live.get(i, r) == r


def test_unplaced_raise_names_feature():
    options = HashTableOptions(bucket_size=2, eviction="none")
    model = make(options, options)
    with pytest.raises(RuntimeError, match="feature 'a'"):
        for i in range(20):
            kjt = jr.KeyedJaggedTensor(KEYS, torch.arange(i * 8, i * 8 + 8), lengths=torch.tensor([8] + [0] * 11))
            model.remap(kjt)
    assert int(model.unplaced_counts()["a"]) > 0
    model.eval()  # eval never raises: absent ids read the fallback row
    kjt = jr.KeyedJaggedTensor(KEYS, torch.arange(1000, 1008), lengths=torch.tensor([8] + [0] * 11))
    assert model.remap(kjt).values().tolist() == [12] * 8


FUSED = [optim.SGD(lr=0.1), optim.RowWiseAdagrad(lr=0.1), optim.Adam(lr=0.1), optim.Adagrad(lr=0.1),
         optim.LarsSGD(lr=0.1), optim.PartialRowWiseAdam(lr=0.1), optim.LAMB(lr=0.1), optim.PartialRowWiseLAMB(lr=0.1),
         optim.RowWiseAdagrad(lr=0.1, weight_decay=0.01, weight_decay_mode="decouple")]


@pytest.mark.parametrize("fused", FUSED, ids=lambda f: f"{type(f).__name__}{f.kind}")
def test_evicted_row_and_state_reset(fused):
    options = HashTableOptions(bucket_size=2, eviction="lru", unplaced="fallback")
    model, sim = make(options, options, fused=fused), sim_for(options, options)
    model.hash_state.eager_compaction = fused.kind % 2 == 0  # both paths, over the optimizers
    rng = random.Random(fused.kind)
    pool = [rng.randrange(2**40) for _ in range(40)]
    resets = 0
    state = model.fused_optimizer_state
    per = {f"fp32_{name}": kind for name, kind in fused.state}
    row_base = {t: sum(x.rows for x in model.layout.tables if x.offset < model.layout.tables[t].offset)
                for t in range(3)}
    for step in range(12):
        kjt, positions = batch(rng, pool, torch.int64)
        weights = {t: model.table_weight(t).clone() for t in range(3)}
        states = {n: getattr(state, n).clone() for n in per}
        model.remap(kjt)
        _, evictions, _ = sim.batch(positions)
        evicted = {(name, r) for name, r, _ in evictions}
        for name, t in [("h0", 0), ("h1", 2)]:
            config, slot = model.embedding_bag_configs()[t], model.layout.tables[t]
            for r in range(config.num_embeddings):
                w_new, w_old = model.table_weight(t)[r], weights[t][r]
                if (name, r) in evicted:
                    resets += 1
                    assert bool(((w_new >= config.weight_init_min) & (w_new <= config.weight_init_max)).all())
                    assert not torch.equal(w_new, w_old)
                else:
                    assert torch.equal(w_new, w_old)
                for n, kind in per.items():
                    if kind == "row":
                        v_new, v_old = getattr(state, n)[row_base[t] + r], states[n][row_base[t] + r]
                    else:
                        v_new = getattr(state, n).narrow(0, slot.offset + r * slot.dim, slot.dim)
                        v_old = states[n].narrow(0, slot.offset + r * slot.dim, slot.dim)
                    if (name, r) in evicted:
                        assert not bool(v_new.any()), (n, name, r)
                    else:
                        assert torch.equal(v_new, v_old), (n, name, r)
        # train the rows just placed (eval: looked up, not placed again), so that state builds up
        model.eval()
        static = model.remap(kjt)
        model.train()
        jr.EmbeddingBagCollection.forward(model, static).values().square().sum().backward()
        assert any(bool(states[n].any()) for n in per) or not per or step == 0
    assert resets > 0


@pytest.mark.parametrize("compaction", [True, False], ids=["compact", "fixed_shapes"])
def test_batches_with_no_ids_and_no_bags(compaction):
    options = HashTableOptions(bucket_size=3, admit_threshold=2)
    model = make(options, options, fused=optim.Adam(lr=0.1))
    model.hash_state.eager_compaction = compaction
    empty = jr.KeyedJaggedTensor(KEYS, torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(4 * B, dtype=torch.int64))
    out = model(empty).values()
    out.sum().backward()
    assert out.shape == (B, 4 + 4 + 5 + 3) and not bool(out.any())
    no_bags = jr.KeyedJaggedTensor(KEYS, torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64),
                                   stride=0)
    assert model(no_bags).values().shape == (0, 16)
    assert int(model.hash_state.step) == 2
    model.eval()
    assert model(empty).values().shape == (B, 16)
