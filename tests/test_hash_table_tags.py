"""The eager probe's tag hint (``hash_probe_torch.hinted_probe``: one byte of each slot's id
hash, a bucket of 8 slots' tags read as one word) against the plain-Python simulator
(tests/hash_table_sim.py): ids that share their bucket *and* their tag (the hint names the
lower slot, the full probe must find the id), tags overwritten with garbage between batches
(a stale hint must cost time only), and the tags rebuilt from the keys on load."""

import random

import pytest
import torch

import jaggedrec as jr
from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions
from jaggedrec.ops import hash_probe_torch as hp

from hash_table_sim import EMPTY, SimTable, Simulator, mix

ROWS = 2 * 8 + 1  # two buckets of 8 beside the fallback row


def _model(eviction: str = "lru"):
    options = HashTableOptions(bucket_size=8, eviction=eviction, unplaced="fallback")
    tables = [jr.EmbeddingBagConfig(name="h", embedding_dim=4, num_embeddings=ROWS, feature_names=["a"])]
    return HashEmbeddingBagCollection(tables, {"h": options}, backend="torch")


def _tag(i: int) -> int:
    return (mix(i) & (2**64 - 1)) >> 56


def _colliding_pool(rng: random.Random, count: int):
    """``count`` ids of bucket 0 that share one tag, and as many of bucket 1 of mixed tags."""
    same, other = [], []
    while len(same) < count or len(other) < count:
        i = rng.randrange(-2**62, 2**62)
        bucket = (mix(i) & (2**63 - 1)) % 2
        if bucket == 0 and _tag(i) == 7 and len(same) < count:
            same.append(i)
        elif bucket == 1 and len(other) < count:
            other.append(i)
    return same, other


def _run(model, sim, batches, between=None):
    """Remap each batch (training) and compare rows and live ids with the simulator."""
    saw_eviction = False
    for step, ids in enumerate(batches):
        if between is not None:
            between(model)
        kjt = jr.KeyedJaggedTensor(["a"], torch.tensor(ids, dtype=torch.int64), lengths=torch.tensor([len(ids)]))
        got = model.remap(kjt).values().tolist()
        rows, evictions, _ = sim.batch([("h", i) for i in ids], True)
        assert got == [ROWS - 1 if r is None else r for r in rows], step
        keys = model.hash_state.live_ids(0).tolist()
        assert {k: r for r, k in enumerate(keys) if k != EMPTY} == sim.tables["h"].live(), step
        saw_eviction |= bool(evictions)
    return saw_eviction


def _batches(rng, same, other, count=14, size=12):
    return [[rng.choice(same if rng.random() < 0.7 else other) for _ in range(size)] for _ in range(count)]


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_ids_sharing_bucket_and_tag_match_simulator(eviction):
    rng = random.Random(26 + (eviction == "lfu"))
    same, other = _colliding_pool(rng, 12)  # 12 ids of one tag for 8 slots: the hint's slot is often another id's
    model = _model(eviction)
    assert model.hash_state.tags.numel() == model.hash_state.keys.numel()
    sim = Simulator({"h": SimTable(ROWS, 8, eviction)})
    assert _run(model, sim, _batches(rng, same, other))
    state = model.hash_state
    assert torch.equal(state.tags, torch.where(torch.arange(state.tags.numel()) < state.num_slots,
                                               hp.tags_of_keys(state.keys), state.tags))


def test_stale_tags_cost_no_result():
    rng = random.Random(261)
    same, other = _colliding_pool(rng, 6)
    pool = same + other + [rng.randrange(-2**62, 2**62) for _ in range(10)]
    batches = [[rng.choice(pool) for _ in range(10)] for _ in range(12)]
    gen = torch.Generator().manual_seed(261)

    def scramble(model):  # every slot's tag replaced by a random byte
        model.hash_state.tags.copy_(torch.randint(0, 256, model.hash_state.tags.shape, generator=gen,
                                                  dtype=torch.int64).to(torch.uint8))

    model = _model()
    assert _run(model, Simulator({"h": SimTable(ROWS, 8, "lru")}), batches, scramble)


def test_tags_rebuilt_on_load():
    rng = random.Random(262)
    same, other = _colliding_pool(rng, 6)
    model = _model()
    _run(model, Simulator({"h": SimTable(ROWS, 8, "lru")}), _batches(rng, same, other, count=3))
    fresh = _model()
    assert not fresh.hash_state.tags.any()
    fresh.load_state_dict(model.state_dict())
    state = fresh.hash_state
    assert "hash_state.tags" not in model.state_dict()
    assert torch.equal(state.tags, hp.tags_of_keys(state.keys))
    live = state.keys.narrow(0, 0, state.num_slots) != hp.EMPTY
    assert live.any() and bool((state.tags.narrow(0, 0, state.num_slots)[live] == torch.tensor(
        [_tag(k) for k in state.keys.narrow(0, 0, state.num_slots)[live].tolist()], dtype=torch.uint8)).all())
