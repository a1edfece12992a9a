"""The eager probe's word path (``hash_probe_torch._packed``: a bucket's matches read as the
bytes of one word, for buckets of 1, 2, 4 or 8 slots) against the plain-Python simulator
(tests/hash_table_sim.py), batch after batch with eviction, on both placement paths; and the
probe's slot at every offset of a bucket, against a Python scan of the keys."""

import random

import pytest
import torch

import jaggedrec as jr
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.ops import hash_probe_torch as hp

from hash_table_sim import EMPTY, SimTable, Simulator
from test_hash_table_properties import batch


@pytest.mark.parametrize("compaction", [True, False], ids=["compact", "fixed_shapes"])
@pytest.mark.parametrize("eviction", ["lru", "lfu"])
@pytest.mark.parametrize("bucket_size", [1, 2, 4, 8])
def test_word_probe_rows_match_simulator(bucket_size, eviction, compaction):
    rng = random.Random(bucket_size * 10 + (eviction == "lfu"))
    rows0, rows1 = 3 * bucket_size + 1, 2 * bucket_size + 1  # 3 and 2 buckets beside the fallback row
    options = HashTableOptions(bucket_size=bucket_size, eviction=eviction, unplaced="fallback")
    tables = [jr.EmbeddingBagConfig(name="h0", embedding_dim=4, num_embeddings=rows0, feature_names=["a", "b"]),
              jr.EmbeddingBagConfig(name="s", embedding_dim=3, num_embeddings=7, feature_names=["d"]),
              jr.EmbeddingBagConfig(name="h1", embedding_dim=5, num_embeddings=rows1, feature_names=["c"])]
    model = HashEmbeddingBagCollection(tables, {"h0": options, "h1": options}, backend="torch")
    model.hash_state.eager_compaction = compaction
    sim = Simulator({"h0": SimTable(rows0, bucket_size, eviction), "h1": SimTable(rows1, bucket_size, eviction)})
    pool = [rng.randrange(-2**62, 2**62) for _ in range(6 * bucket_size + 4)]
    saw_eviction = False
    for step in range(12):
        training = step % 4 != 3
        model.train(training)
        kjt, positions = batch(rng, pool, torch.int64)
        got = model.remap(kjt).values().tolist()
        rows, evictions, _ = sim.batch(positions, training)
        assert got == [v if r is None else r for (_, v), r in zip(positions, rows)], step
        for h, name in enumerate(["h0", "h1"]):
            keys = model.hash_state.live_ids(h).tolist()
            assert {k: r for r, k in enumerate(keys) if k != EMPTY} == sim.tables[name].live(), (step, name)
        saw_eviction |= bool(evictions)
    assert saw_eviction


@pytest.mark.parametrize("bucket_size", [1, 2, 3, 4, 8])
def test_probe_slot_at_every_offset(bucket_size):
    gen = torch.Generator().manual_seed(bucket_size)
    num_buckets = 5
    keys = torch.randint(-2**62, 2**62, (num_buckets * bucket_size + 1,), generator=gen)
    keys[torch.randperm(keys.numel() - 1, generator=gen)[:bucket_size]] = hp.EMPTY  # some free slots
    buckets = torch.arange(num_buckets).repeat_interleave(bucket_size + 2)
    ids = torch.randint(-2**62, 2**62, buckets.shape, generator=gen)
    for b in range(num_buckets):  # every offset of every bucket, plus an absent id and EMPTY
        base = b * (bucket_size + 2)
        ids[base:base + bucket_size] = keys[b * bucket_size:(b + 1) * bucket_size]
        ids[base + bucket_size + 1] = hp.EMPTY
    found, slot = hp.probe(keys, bucket_size, ids, buckets)
    for i, (key, b) in enumerate(zip(ids.tolist(), buckets.tolist())):
        window = keys[b * bucket_size:(b + 1) * bucket_size].tolist()
        want = key != EMPTY and key in window
        assert bool(found[i]) == want, i
        if want:
            assert int(slot[i]) == b * bucket_size + window.index(key), i
