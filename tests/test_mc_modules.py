"""MCHManagedCollisionModule against an exact Python simulator (plain lists and dicts, no
tensors), property tests of the id -> row map, the unplaced-id policy, and compile-cleanliness
over batches that insert and evict. TorchRec itself is not needed (test_mc_torchrec.py)."""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from jaggedrec.modules import mc_modules as mc
from jaggedrec.sparse.jagged_tensor import JaggedTensor

INT64_MAX = 2**63 - 1
POLICIES = {"lfu": mc.LFU_EvictionPolicy, "lru": mc.LRU_EvictionPolicy, "dlfu": mc.DistanceLFU_EvictionPolicy}


class Simulator:
    """The managed-collision map in plain Python: ``slots`` is the sorted buffer, each slot a dict
    of raw id (None: free), row, count and last access; evictions follow the rule stated in
    MCHManagedCollisionModule (stable ranking, live ids first, k-th newcomer -> k-th loser)."""

    def __init__(self, zch: int, interval: int, policy: str) -> None:
        self.zch, self.interval, self.policy = zch, interval, policy
        self.slots = [dict(raw=None, row=r, count=0, last=0) for r in range(zch)]
        self.iter, self.history, self.capacity = 0, [], None
        self.evicted_rows: set = set()

    def score(self, count: int, last: int) -> float:
        dist = self.iter - last + 1
        if self.policy == "lfu":
            return count
        if self.policy == "lru":
            return -float(torch.tensor(dist, dtype=torch.float32))
        return float(torch.tensor(count) / torch.tensor(dist, dtype=torch.float32))

    def step(self, ids: List[int]) -> List[int]:
        if self.capacity is None:
            self.capacity = int(len(ids) * self.interval * 1.25)
        self.iter += 1
        room = self.capacity - len(self.history)
        self.history += [(i, self.iter) for i in ids[:max(room, 0)]]
        if self.iter % self.interval == 0:
            self.evict()
        rows = {s["raw"]: s["row"] for s in self.slots[:-1] if s["raw"] is not None}
        return [rows.get(i, self.slots[-1]["row"]) for i in ids]

    def evict(self) -> None:
        counts = Counter(i for i, _ in self.history)
        last = {i: max(t for j, t in self.history if j == i) for i in counts}
        self.history = []
        live = {s["raw"]: s for s in self.slots[:-1] if s["raw"] is not None}
        newcomers = []
        for i in sorted(counts, key=lambda i: (-counts[i], i)):
            if i in live:
                live[i]["count"] += counts[i]
                live[i]["last"] = last[i]
            else:
                newcomers.append(i)
        self.slots[-1]["count"], self.slots[-1]["last"] = INT64_MAX, self.iter
        entries = [(self.score(s["count"], s["last"]), k) for k, s in enumerate(self.slots)]
        entries += [(self.score(counts[i], last[i]), self.zch + k) for k, i in enumerate(newcomers)]
        ranked = [k for _, k in sorted(entries, key=lambda e: -e[0])]  # sorted() is stable
        takers = [k - self.zch for k in ranked[:self.zch] if k >= self.zch]
        losers = [k for k in ranked[self.zch:] if k < self.zch]
        for slot, new in zip(losers, takers):
            i = newcomers[new]
            self.slots[slot].update(raw=i, count=counts[i], last=last[i])
            self.evicted_rows.add(self.slots[slot]["row"])
        self.slots.sort(key=lambda s: INT64_MAX if s["raw"] is None else s["raw"])


def _module(zch: int, interval: int, policy: str, **kw) -> mc.MCHManagedCollisionModule:
    return mc.MCHManagedCollisionModule(zch_size=zch, device=torch.device("cpu"), eviction_policy=POLICIES[policy](),
                                        eviction_interval=interval, name="t", **kw)


def _remap(module, ids: torch.Tensor, name: str = "f") -> torch.Tensor:
    jt = JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))
    return module({name: jt})[name].values()


batches = st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None)
@given(batches=batches, zch=st.integers(2, 9), interval=st.integers(1, 3), policy=st.sampled_from(sorted(POLICIES)))
def test_rows_match_exact_simulator(batches, zch, interval, policy):
    """Rows, evicted rows and eviction metadata match the simulator batch by batch; the map
    stays injective and an id keeps its row until it is evicted."""
    module, sim = _module(zch, interval, policy), Simulator(zch, interval, policy)
    owner: Dict[int, int] = {}  # row -> raw id holding it
    for ids in batches:
        got = _remap(module, torch.tensor(ids)).tolist()
        assert got == sim.step(ids)
        evicted = module.evict()
        assert set(evicted.tolist() if evicted is not None else []) == sim.evicted_rows
        for row in sim.evicted_rows:
            owner.pop(row, None)
        sim.evicted_rows = set()
        for i, r in zip(ids, got):
            if r == zch - 1:
                continue
            assert owner.setdefault(r, i) == i, f"row {r} shared by {owner[r]} and {i}"
        live = module.state_dict()["_mch_sorted_raw_ids"]
        assert int((live != INT64_MAX).sum()) <= zch - 1
        assert live.tolist() == [INT64_MAX if s["raw"] is None else s["raw"] for s in sim.slots]
        if policy != "lru":  # state of a replaced slot restarts from its new id's counts
            assert module.state_dict()["_mch_counts"][:-1].tolist() == [s["count"] for s in sim.slots[:-1]]


def test_lfu_keeps_frequent_ids_and_resets_counts():
    module = _module(4, 1, "lfu")  # three rows to give out
    _remap(module, torch.tensor([5, 5, 5, 6, 6, 7]))
    assert sorted(module.state_dict()["_mch_sorted_raw_ids"][:3].tolist()) == [5, 6, 7]
    # 8 (twice) beats 7 (once, seen before); 7's row goes to 8 with 8's count, not 7's
    row7 = int(_remap(module, torch.tensor([7]))[0])
    module.evict()
    rows = _remap(module, torch.tensor([8, 8, 8]))
    assert rows.tolist() == [row7] * 3 and module.evict().tolist() == [row7]
    assert _remap(module, torch.tensor([7])).tolist() == [3]  # 7 lost its row: the fallback
    sd = module.state_dict()
    assert int(sd["_mch_counts"][sd["_mch_sorted_raw_ids"] == 8]) == 3


def test_unplaced_ids_are_counted_and_can_raise():
    module = _module(3, 2, "lfu")
    rows = _remap(module, torch.tensor([1, 2, 3]))  # before the first eviction: nothing is live
    assert rows.tolist() == [2, 2, 2] and module.unplaced_count().tolist() == [3]
    strict = _module(3, 1, "lfu", unplaced="raise")
    _remap(strict, torch.tensor([1, 1, 2]), name="user_id")  # 1 and 2 fit (two rows)
    with pytest.raises(RuntimeError, match="user_id"):
        _remap(strict, torch.tensor([1, 1, 3, 4, 4]), name="user_id")  # 3 loses to 1 and 4
    with pytest.raises(ValueError, match="unplaced"):
        _module(3, 1, "lfu", unplaced="zeros")
    with pytest.raises(ValueError, match="zch_size"):
        _module(0, 1, "lfu")


def test_eval_mode_neither_records_nor_evicts():
    module = _module(5, 1, "lru")
    _remap(module, torch.tensor([4, 9]))
    module.eval()
    assert _remap(module, torch.tensor([4, 11, 9])).tolist()[1] == 4
    assert int(module.state_dict()["_current_iter_tensor"]) == 1
    assert module.open_slots().tolist() == [2]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_id_dtype_kept(dtype):
    module = _module(6, 1, "dlfu")
    out = _remap(module, torch.tensor([3, 1, 3], dtype=dtype))
    assert out.dtype == dtype and out[0] == out[2] and out[0] != out[1]


def test_compile_one_graph_across_evictions():
    """fullgraph over 40 batches of varying size that insert and evict: no graph break, at most
    two graphs (static, then dynamic shapes), the same rows as the eager module."""
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(3)
    eager, compiled_module = _module(9, 2, "dlfu"), _module(9, 2, "dlfu")
    for m in (eager, compiled_module):
        m.init_history(10)
    cnt = CompileCounter()
    compiled = torch.compile(lambda v: _remap(compiled_module, v), backend=cnt, fullgraph=True)
    evicted_rows: Optional[torch.Tensor] = None
    for _ in range(40):
        ids = torch.randint(0, 20, (int(torch.randint(4, 11, (1,), generator=gen)),), generator=gen)
        assert torch.equal(compiled(ids), _remap(eager, ids))
        evicted_rows = eager.evict() if evicted_rows is None else evicted_rows
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert cnt.frame_count <= 2
    assert evicted_rows is not None and evicted_rows.numel() > 0  # the batches did evict
    for k, v in eager.state_dict().items():
        assert torch.equal(v, compiled_module.state_dict()[k]), k
    torch._dynamo.reset()
