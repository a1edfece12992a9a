"""HashZchManagedCollisionModule's opt-in and id frequencies against the dict oracle of
test_mc_hash_modules, extended: the last ``r`` slots of each bucket are reserved (never hold an
id; ids probe only the others), a new id is admitted when its ``torch.rand`` draw (x100,
truncated) is below ``opt_in_prob``, and an id not admitted or without a slot reads reserved slot
``home % r`` of its bucket. With ``track_id_freq`` each slot counts the training lookups of the
id it holds, from 0 when the slot changes hands. The draws are replayed from the same seed, so
the oracle sees the module's inputs, not its outputs."""

from __future__ import annotations

from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jaggedrec.modules import hash_mc_evictions as ev
from jaggedrec.modules.embedding_configs import ConfigError
from jaggedrec.modules.hash_mc_modules import HashZchManagedCollisionModule
from test_mc_hash_modules import REAL_CLOCK, Oracle, _home, _module, _remap


class OptInOracle(Oracle):
    def __init__(self, zch, buckets, probe, ttl, lru, reserved, opt_in_prob):
        super().__init__(zch, buckets, probe, ttl, lru)
        self.reserved = 0 if lru else reserved  # FBGEMM's LRU kernel ignores opt-in
        self.opt_in_prob = opt_in_prob
        self.counts = {}  # slot -> lookups of its id

    def window(self, i: int) -> List[int]:
        start, open_slots = (i % self.buckets) * self.size, self.size - self.reserved
        return [start + (_home(i) % open_slots + p) % open_slots for p in range(min(self.probe, open_slots))]

    def reserved_slot(self, i: int) -> int:
        start = (i % self.buckets) * self.size
        return start + self.size - self.reserved + _home(i) % self.reserved

    def step(self, ids, now, train, draws=None):
        held = {i for i in ids if any(self.table.get(s) == i for s in self.window(i))}
        out_of = set()
        if train and draws is not None:
            out_of = {i for i, d in zip(ids, draws) if i not in held and d >= self.opt_in_prob}
        # an id not admitted in one of its lookups is not placed in that batch (the module settles
        # ids per lookup: any of its lookups admitted lets it in)
        admitted = [i for i in ids if i not in out_of or any(j == i and d < self.opt_in_prob
                                                              for j, d in zip(ids, draws or []))]
        before = dict(self.table)
        rows = super().step(admitted, now, train) if admitted else []
        row_of = dict(zip(admitted, rows))
        for s in self.evicted | {s for s in self.table if before.get(s) != self.table[s]}:
            self.counts[s] = 0
        result = []
        for i in ids:
            own = [s for s in self.window(i) if self.table.get(s) == i]
            if own:
                result.append(own[0])
                if train:
                    self.counts[own[0]] = self.counts.get(own[0], 0) + 1
            else:
                result.append(self.reserved_slot(i) if self.reserved else row_of.get(i, self.window(i)[0]))
        return result


def _draws(seed: int, n: int) -> List[int]:
    torch.manual_seed(seed)
    return (torch.rand(n) * 100).to(torch.int32).tolist()


@settings(max_examples=12, deadline=None)
@given(batches=st.lists(st.tuples(st.lists(st.integers(0, 80), max_size=10), st.integers(0, 3), st.booleans()),
                        min_size=1, max_size=8),
       shape=st.sampled_from([(16, 2, 8, 25.0), (12, 1, 3, 20.0), (18, 3, 6, 40.0)]),
       opt_in_prob=st.sampled_from([100, 50, 10]),
       policy=st.sampled_from([None, ev.HashZchEvictionPolicyName.SINGLE_TTL_EVICTION,
                               ev.HashZchEvictionPolicyName.LRU_EVICTION]))
def test_opt_in_slots_and_frequencies_match_oracle(batches, shape, opt_in_prob, policy):
    zch, buckets, probe, percent = shape
    module = _module(zch, buckets, probe, policy, ttl=1, opt_in_prob=opt_in_prob, percent_reserved_slots=percent,
                     track_id_freq=True)
    reserved = module.get_reserved_slots_per_bucket()
    assert reserved == int(zch * percent / 100 / buckets) >= 1
    lru = policy == ev.HashZchEvictionPolicyName.LRU_EVICTION
    oracle = OptInOracle(zch, buckets, probe, 1 if policy else None, lru, reserved, opt_in_prob)
    now = 100
    try:
        for k, (ids, tick, train) in enumerate(batches):
            now += tick
            ev.now_hours = lambda now=now: now
            module.train(train)
            draws = _draws(k, len(ids)) if train and opt_in_prob < 100 and not lru else None
            torch.manual_seed(k)
            got = _remap(module, ids).tolist()
            assert got == oracle.step(ids, now, train, draws)
            table = module.state_dict()["_hash_zch_identities"].view(-1).tolist()
            assert table == [oracle.table.get(s, -1) for s in range(zch)]
            if not lru:  # reserved slots never hold an id
                assert all(table[s] == -1 for s in module.get_indices_of_reserved_slots_per_bucket().tolist())
            counts = module.state_dict()["_hash_zch_runtime_meta"].view(-1).tolist()
            assert [c for s, c in enumerate(counts) if table[s] != -1] == [
                oracle.counts.get(s, 0) for s in range(zch) if table[s] != -1]
            module.evict()
            oracle.evicted = set()
    finally:
        ev.now_hours = REAL_CLOCK


def test_reserved_slots_of_each_shard():
    """TorchRec's numbers: 80 slots, 8 buckets, 10% reserved: one per bucket, the bucket's last."""
    whole = HashZchManagedCollisionModule(zch_size=80, device=torch.device("cpu"), total_num_buckets=8,
                                          percent_reserved_slots=10.0, opt_in_prob=1)
    assert whole.get_indices_of_reserved_slots_per_bucket().tolist() == list(range(9, 80, 10))
    for lo in (0, 20, 40, 60):
        shard = whole.rebuild_with_output_id_range((lo, lo + 20))
        assert shard.get_reserved_slots_per_bucket() == 1
        assert shard.get_indices_of_reserved_slots_per_bucket().tolist() == [9, 19]
    plain = HashZchManagedCollisionModule(zch_size=8, device=torch.device("cpu"), total_num_buckets=2)
    assert plain.get_reserved_slots_per_bucket() == -1 and plain.get_indices_of_reserved_slots_per_bucket() is None


def test_rebuilt_shard_keeps_every_option():
    """A row-wise shard of the upper two buckets gives the whole table's rows for their ids, with
    the same draws, and keeps the frequencies, the read-only suffix and the options."""
    kw = dict(opt_in_prob=30, percent_reserved_slots=25.0, track_id_freq=True, read_only_suffix="_ro")
    whole = _module(16, 4, 3, ev.HashZchEvictionPolicyName.SINGLE_TTL_EVICTION, ttl=2, **kw)
    shard = whole.rebuild_with_output_id_range((8, 16))
    assert shard.get_reserved_slots_per_bucket() == 1 and shard.is_sharded
    gen = torch.Generator().manual_seed(3)
    for k in range(6):
        ids = (torch.randint(0, 40, (7,), generator=gen) // 4 * 4 + 2 + torch.randint(0, 2, (7,), generator=gen))
        torch.manual_seed(k)
        want = _remap(whole, ids.tolist()).tolist()
        torch.manual_seed(k)
        assert _remap(shard, ids.tolist()).tolist() == want  # global rows, 8..15
    counts = whole.state_dict()["_hash_zch_runtime_meta"].view(-1)
    assert torch.equal(shard.state_dict()["_hash_zch_runtime_meta"].view(-1), counts[8:]) and counts.sum() > 0
    before = shard.state_dict()["_hash_zch_identities"].clone()
    _remap(shard, [1002, 1006, 1010], name="f_ro")  # read-only: nothing placed
    assert torch.equal(shard.state_dict()["_hash_zch_identities"], before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(write_runtime_meta_dim=3, track_id_freq=True), "track_id_freq"),
    (dict(percent_reserved_slots=100.0), "percent_reserved_slots"),
    (dict(opt_in_prob=20), "percent_reserved_slots > 0"),
    (dict(opt_in_prob=20, percent_reserved_slots=1.0), "reserved slots per bucket"),
])
def test_refused_options_raise_naming_the_module(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        HashZchManagedCollisionModule(zch_size=10, device=torch.device("cpu"), total_num_buckets=2, name="user_t",
                                      **kwargs)
    assert "user_t" in str(info.value) and isinstance(info.value, AssertionError)


@pytest.mark.parametrize("input_hash_size", [0, 40])
def test_dispatch_divided_ids_keep_their_bucket_and_store_their_part(input_hash_size):
    """inference_dispatch_div_train_world_size: the bucket comes from the id, the key the slot
    holds (and hashes) is the id's part within its bucket, as TorchRec's input mapper makes it."""
    buckets, zch = 4, 16
    module = _module(zch, buckets, 4, inference_dispatch_div_train_world_size=True, input_hash_size=input_hash_size)
    block = -(-input_hash_size // buckets) if input_hash_size else None
    oracle = Oracle(zch, buckets, 4, None, False)
    ids = [3, 7, 38, 11, 21, 30, 3, 17]
    keys = [i // buckets if block is None else i % block for i in ids]
    bucket = [i % buckets if block is None else i // block for i in ids]
    # the oracle places the keys in the ids' buckets: its window of a key, moved to the id's bucket
    oracle.window = lambda k, b=None: [b * oracle.size + (_home(k) % oracle.size + p) % oracle.size
                                       for p in range(min(oracle.probe, oracle.size))]
    slots, table = [], {}
    for k, b in zip(keys, bucket):
        own = [s for s in oracle.window(k, b) if table.get(s) == k]
        if not own:
            free = [s for s in oracle.window(k, b) if s not in table]
            if free:
                table[free[0]] = k
                own = free[:1]
        slots.append(own[0] if own else oracle.window(k, b)[0])
    assert _remap(module, ids).tolist() == slots
    assert module.state_dict()["_hash_zch_identities"].view(-1).tolist() == [table.get(s, -1) for s in range(zch)]
