"""HashZchManagedCollisionModule (torch ops) against a Python dict oracle: the same slots, the
same evictions, batch by batch, over buckets, short probe windows, TTL and LRU expiry with a
controlled clock; plus the properties (one slot per live id, an id keeps its slot until it
expires and is taken, slots stay in the id's bucket and probe window) and compile-cleanliness."""

from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from jaggedrec.modules import hash_mc_evictions as ev
from jaggedrec.modules.hash_mc_modules import HashZchManagedCollisionModule
from jaggedrec.sparse.jagged_tensor import JaggedTensor

M64 = (1 << 64) - 1
REAL_CLOCK = ev.now_hours


def _signed(x: int) -> int:
    x &= M64
    return x - (1 << 64) if x >> 63 else x


def _home(i: int) -> int:
    """The probe's start before the modulo, in Python ints (splitmix64's steps, arithmetic shifts)."""
    x = _signed(i ^ (i >> 31))
    x = _signed(x * 0x9E3779B97F4A7C15)
    x = _signed(x ^ (x >> 29))
    x = _signed(x * 0xBF58476D1CE4E5B9)
    return (x ^ (x >> 32)) & 0x7FFFFFFFFFFFFFFF


class Oracle:
    def __init__(self, zch: int, buckets: int, probe: int, ttl: Optional[int], lru: bool) -> None:
        self.size, self.buckets, self.probe, self.ttl, self.lru = zch // buckets, buckets, probe, ttl, lru
        self.table: Dict[int, int] = {}  # slot -> id
        self.expiry: Dict[int, int] = {}
        self.evicted: set = set()

    def window(self, i: int) -> List[int]:
        start = (i % self.buckets) * self.size
        return [start + (_home(i) % self.size + p) % self.size for p in range(min(self.probe, self.size))]

    def step(self, ids: List[int], now: int, train: bool) -> List[int]:
        slot_of = {i: s for i in set(ids) for s in self.window(i) if self.table.get(s) == i}
        if train:
            held = set(slot_of.values())
            pending = sorted(set(ids) - set(slot_of))
            while pending:
                choice = {}
                for i in pending:
                    free = [s for s in self.window(i) if s not in held and (
                        s not in self.table or (self.ttl is not None and self.expiry[s] < now))]
                    if free:
                        choice[i] = min(free, key=lambda s: self.expiry.get(s, -1)) if self.lru else free[0]
                if not choice:
                    break
                for i in sorted(choice):  # smallest id first
                    s = choice[i]
                    if s in held:
                        continue
                    if s in self.table:
                        self.evicted.add(s)
                    self.table[s], slot_of[i] = i, s
                    held.add(s)
                pending = [i for i in pending if i not in slot_of]
            if self.ttl is not None:
                for i, s in slot_of.items():
                    self.expiry[s] = now + self.ttl
        return [slot_of.get(i, self.window(i)[0]) for i in ids]


def _module(zch, buckets, probe, policy=None, ttl=None, **kw):
    config = ev.HashZchEvictionConfig(features=["f"], single_ttl=ttl) if policy else None
    return HashZchManagedCollisionModule(zch_size=zch, device=torch.device("cpu"), total_num_buckets=buckets,
                                         max_probe=probe, eviction_policy_name=policy, eviction_config=config,
                                         name="t", **kw)


def _remap(module, ids, name="f"):
    jt = JaggedTensor(values=torch.tensor(ids, dtype=torch.int64), lengths=torch.tensor([len(ids)]))
    return module({name: jt})[name].values()


@settings(max_examples=15, deadline=None)
@given(batches=st.lists(st.tuples(st.lists(st.integers(0, 60), max_size=10), st.integers(0, 3), st.booleans()),
                        min_size=1, max_size=10),
       shape=st.sampled_from([(12, 1, 3), (12, 3, 2), (16, 2, 8), (6, 2, 4)]),
       policy=st.sampled_from([None, ev.HashZchEvictionPolicyName.SINGLE_TTL_EVICTION,
                               ev.HashZchEvictionPolicyName.LRU_EVICTION]))
def test_slots_match_dict_oracle(batches, shape, policy):
    zch, buckets, probe = shape
    module = _module(zch, buckets, probe, policy, ttl=1)
    oracle = Oracle(zch, buckets, probe, 1 if policy else None, policy == ev.HashZchEvictionPolicyName.LRU_EVICTION)
    now = 100
    try:
        _run(module, oracle, batches, now, zch)
    finally:
        ev.now_hours = REAL_CLOCK


def _run(module, oracle, batches, now, zch):
    for ids, tick, train in batches:
        now += tick
        ev.now_hours = lambda now=now: now  # the module reads the clock at each call
        module.train(train)
        got = _remap(module, ids).tolist()
        assert got == oracle.step(ids, now, train)
        live = [i for i in module.state_dict()["_hash_zch_identities"].view(-1).tolist() if i != -1]
        assert len(live) == len(set(live)), "two slots hold one id"
        assert dict(enumerate(module.state_dict()["_hash_zch_identities"].view(-1).tolist())) == {
            s: oracle.table.get(s, -1) for s in range(zch)}
        evicted = module.evict()
        assert set(evicted.tolist() if evicted is not None else []) == oracle.evicted
        oracle.evicted = set()


def test_ids_keep_their_slot_until_taken_after_expiry(monkeypatch):
    monkeypatch.setattr(ev, "now_hours", lambda: 10)
    module = _module(4, 1, 4, ev.HashZchEvictionPolicyName.SINGLE_TTL_EVICTION, ttl=2)
    first = _remap(module, [1, 2, 3, 4]).tolist()
    assert sorted(first) == [0, 1, 2, 3]
    assert _remap(module, [5]).tolist()[0] == Oracle(4, 1, 4, 2, False).window(5)[0]  # full: home slot, shared
    assert module.unplaced_count().tolist() == [1]
    monkeypatch.setattr(ev, "now_hours", lambda: 11)
    assert _remap(module, [4, 3, 2, 1]).tolist() == first[::-1]  # refreshed: expire after hour 13
    monkeypatch.setattr(ev, "now_hours", lambda: 14)
    rows = _remap(module, [1, 6]).tolist()  # 2, 3, 4 expired; 1 is refreshed as it is found
    assert rows[0] == first[0] and rows[1] in first[1:] and module.evict().tolist() == [rows[1]]


def test_unplaced_raise_and_disable_fallback():
    strict = _module(2, 1, 2, unplaced="raise")
    _remap(strict, [7, 8])
    with pytest.raises(RuntimeError, match="feature user"):
        _remap(strict, [9], name="user")
    dropping = _module(2, 1, 2, disable_fallback=True)
    jt = JaggedTensor(values=torch.tensor([7, 8, 9, 7]), lengths=torch.tensor([2, 0, 2]))
    out = dropping({"f": jt})["f"]
    assert out.lengths().tolist() == [2, 0, 1] and out.values().numel() == 3
    assert dropping.unplaced_count().tolist() == [1]
    with pytest.raises(ValueError, match="multiple"):
        _module(10, 3, 2)


def test_state_dict_keys_are_torchrecs():
    sd = _module(8, 2, 4, ev.HashZchEvictionPolicyName.LRU_EVICTION, ttl=1).state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == {
        "_hash_zch_identities": ((8, 1), torch.int64), "_hash_zch_metadata": ((8, 1), torch.int32),
        "_hash_zch_bucket": ((1, 1), torch.int64)}


# opt-in draws torch.rand inside the graph: each batch seeds both runs alike
@pytest.mark.parametrize("kw", [{}, dict(opt_in_prob=50, percent_reserved_slots=25.0, track_id_freq=True)])
def test_compile_without_graph_breaks(kw):
    torch._dynamo.reset()
    counters.clear()
    eager, model = _module(32, 4, 4, **kw), _module(32, 4, 4, **kw)
    cnt = CompileCounter()
    compiled = torch.compile(lambda v: model({"f": JaggedTensor(values=v, lengths=v.new_ones(v.numel()))})["f"]
                             .values(), backend=cnt, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for k in range(10):
        ids = torch.randint(0, 200, (8,), generator=gen)
        torch.manual_seed(k)
        got = compiled(ids)
        torch.manual_seed(k)
        assert torch.equal(got, _remap(eager, ids.tolist()))
    for key, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert cnt.frame_count == 1
    torch._dynamo.reset()


def test_rebuilt_shard_keeps_its_buckets_rows():
    full = _module(8, 4, 2)
    shard = full.rebuild_with_output_id_range((4, 8))
    assert shard.is_sharded and not full.is_sharded and not full.rebuild_with_output_id_range((0, 8)).is_sharded
    ids = [2, 3, 6, 7, 10]  # buckets 2 and 3 (id % 4)
    rows = _remap(shard, ids).tolist()
    oracle = Oracle(8, 4, 2, None, False)
    assert rows == oracle.step(ids, 0, True)  # the same global rows as the whole table would give
    assert all(4 <= r < 8 for r in rows) and shard.state_dict()["_hash_zch_identities"].shape == (4, 1)


def test_runtime_meta_written_read_and_cleared_on_replacement(monkeypatch):
    monkeypatch.setattr(ev, "now_hours", lambda: 5)
    module = _module(2, 1, 2, ev.HashZchEvictionPolicyName.SINGLE_TTL_EVICTION, ttl=1, write_runtime_meta_dim=2)
    jt = JaggedTensor(values=torch.tensor([7, 8, 9]), lengths=torch.tensor([3]))
    rows = module.remap({"f": jt}, write_weights=torch.tensor([[1, 2], [3, 4], [5, 6]]))["f"].values()
    # 9 found no slot: its weights are not written over the id it shares a slot with
    assert module.lookup_custom_runtime_meta(rows[:2]).tolist() == [[1, 2], [3, 4]]
    assert module.lookup_runtime_meta(torch.tensor([7, 9]), rows[[0, 2]]).tolist() == [1, 2, 0, 0]
    monkeypatch.setattr(ev, "now_hours", lambda: 9)  # 7 and 8 expired
    _remap(module, [8, 10])  # 8 refreshed; 10 takes 7's slot, whose metadata is cleared
    assert module.lookup_custom_runtime_meta(rows[:2]).tolist() == [[0, 0], [3, 4]]


def _mix_reference(v: int) -> int:
    """The module's id mix in Python ints: splitmix64's steps, arithmetic shifts, wrapping products."""
    def signed(x):
        x %= 2 ** 64
        return x - 2 ** 64 if x >= 2 ** 63 else x

    x = v ^ (v >> 31)
    x = signed(x * -7046029254386353131)
    x = x ^ (x >> 29)
    x = signed(x * -4658895280553007687)
    return (x ^ (x >> 32)) & (2 ** 63 - 1)


def test_id_mix_compiled_by_inductor_equals_python_ints():
    # compiled, the mix's products must not be C++ signed int64 multiplies (overflow is undefined
    # behaviour there): the placement module routes them through wrapping_mul
    from jaggedrec.modules.hash_mc_placement import _mix

    ids = torch.randint(-2 ** 63, 2 ** 63 - 1, (3001,), generator=torch.Generator().manual_seed(5))
    ids[:4] = torch.tensor([0, -1, 2 ** 63 - 1, -2 ** 63])
    torch._dynamo.reset()
    got = torch.compile(_mix, fullgraph=True)(ids)
    torch._dynamo.reset()
    assert got.tolist() == [_mix_reference(v) for v in ids.tolist()]
