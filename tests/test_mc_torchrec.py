"""jaggedrec's managed-collision modules beside TorchRec's on the same batches: the same rows,
evicted rows and state; TorchRec's checkpoints load into ours and ours into TorchRec's; the
MC-EBC's output equals TorchRec's with the same weights. Needs TorchRec (skipped without)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchrec")

import torchrec  # noqa: E402
from torchrec.modules import mc_embedding_modules as tr_mce  # noqa: E402
from torchrec.modules import mc_modules as tr_mc  # noqa: E402

import jaggedrec as jr  # noqa: E402
from jaggedrec.modules import mc_embedding_modules as jr_mce  # noqa: E402
from jaggedrec.modules import mc_modules as jr_mc  # noqa: E402
from jaggedrec.sparse.jagged_tensor import JaggedTensor  # noqa: E402

CPU = torch.device("cpu")
CASES = [("LFU_EvictionPolicy", {}), ("LRU_EvictionPolicy", {"decay_exponent": 1.5}),
         ("DistanceLFU_EvictionPolicy", {"decay_exponent": 0.5}),
         ("LFU_EvictionPolicy", {"threshold_filtering_func": "average_threshold_filter"}),
         ("DistanceLFU_EvictionPolicy", {"threshold_filtering_func": "dynamic_threshold_filter"})]


def _pair(policy: str, kw: dict, zch: int, interval: int):
    def make(ns):
        args = {k: getattr(ns, v) if k == "threshold_filtering_func" else v for k, v in kw.items()}
        if "dynamic" in str(kw.get("threshold_filtering_func")):
            fn = getattr(ns, "dynamic_threshold_filter")
            args["threshold_filtering_func"] = lambda c: fn(c, threshold_skew_multiplier=0.5)
        return ns.MCHManagedCollisionModule(zch_size=zch, device=CPU, eviction_policy=getattr(ns, policy)(**args),
                                            eviction_interval=interval, input_hash_size=1000, name="t")
    return make(tr_mc), make(jr_mc)


def _batch(gen: torch.Generator, hot: int = 40):
    lengths = torch.randint(0, 5, (4,), generator=gen)
    lengths[int(torch.randint(0, 4, (1,), generator=gen))] = 0  # an empty bag
    values = torch.randint(0, hot, (int(lengths.sum()),), generator=gen)
    return values, lengths


@pytest.mark.parametrize("policy,kw", CASES)
@pytest.mark.parametrize("zch,interval", [(8, 1), (13, 3)])
def test_same_rows_evictions_and_state(policy, kw, zch, interval):
    gen = torch.Generator().manual_seed(zch + interval)
    theirs, ours = _pair(policy, kw, zch, interval)
    for step in range(15):
        values, lengths = _batch(gen)
        dtype = torch.int32 if step % 2 else torch.int64  # TorchRec's remap takes int64 only
        expected = theirs({"f": torchrec.JaggedTensor(values=values, lengths=lengths)})["f"]
        got = ours({"f": JaggedTensor(values=values.to(dtype), lengths=lengths)})["f"]
        assert got.values().dtype == dtype
        assert torch.equal(got.values().long(), expected.values()) and torch.equal(got.lengths(), expected.lengths())
        ev_t, ev_o = theirs.evict(), ours.evict()
        assert (ev_t is None) == (ev_o is None)
        if ev_t is not None:
            assert torch.equal(torch.unique(ev_t), ev_o)
        assert torch.equal(theirs.open_slots(), ours.open_slots())
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_t) == list(sd_o)
    for k in sd_t:
        assert torch.equal(sd_t[k], sd_o[k]), k


@pytest.mark.parametrize("direction", ["torchrec_to_jaggedrec", "jaggedrec_to_torchrec"])
def test_state_dict_loads_both_ways(direction):
    gen = torch.Generator().manual_seed(7)
    src_t, src_o = _pair("DistanceLFU_EvictionPolicy", {}, 11, 2)
    for _ in range(5):
        values, lengths = _batch(gen)
        src_t({"f": torchrec.JaggedTensor(values=values, lengths=lengths)})
        src_o({"f": JaggedTensor(values=values, lengths=lengths)})
    # a checkpoint of one side loads into both; from there the two go on alike (a loaded module
    # restarts its history and eviction count at the saved iteration, as TorchRec's does)
    state = (src_t if direction == "torchrec_to_jaggedrec" else src_o).state_dict()
    dst_t, dst_o = _pair("DistanceLFU_EvictionPolicy", {}, 11, 2)
    dst_t.load_state_dict(state)
    dst_o.load_state_dict(state)
    for _ in range(6):
        values, lengths = _batch(gen)
        a = dst_t({"f": torchrec.JaggedTensor(values=values, lengths=lengths)})["f"].values()
        b = dst_o({"f": JaggedTensor(values=values, lengths=lengths)})["f"].values()
        assert torch.equal(a, b)
    for k, v in dst_t.state_dict().items():
        assert torch.equal(v, dst_o.state_dict()[k]), k


def test_mc_ebc_matches_torchrec():
    gen = torch.Generator().manual_seed(5)
    def build(ns, mc, mce):
        configs = [ns.EmbeddingBagConfig(name="t0", embedding_dim=6, num_embeddings=12, feature_names=["a", "b"]),
                   ns.EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=9, feature_names=["c"])]
        modules = {c.name: mc.MCHManagedCollisionModule(zch_size=c.num_embeddings, device=CPU,
                                                        eviction_policy=mc.LRU_EvictionPolicy(), eviction_interval=2)
                   for c in configs}
        return mce.ManagedCollisionEmbeddingBagCollection(
            ns.EmbeddingBagCollection(tables=configs), mc.ManagedCollisionCollection(modules, configs),
            return_remapped_features=True)
    theirs, ours = build(torchrec, tr_mc, tr_mce), build(jr, jr_mc, jr_mce)
    ours.load_state_dict(theirs.state_dict())  # the same weights, keys alike
    for _ in range(8):
        keys = ["c", "a", "b"]
        parts = [_batch(gen, hot=25) for _ in keys]
        values, lengths = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        out_t, rem_t = theirs(torchrec.KeyedJaggedTensor(keys=keys, values=values, lengths=lengths))
        out_o, rem_o = ours(jr.KeyedJaggedTensor(keys=keys, values=values, lengths=lengths))
        assert rem_o.keys() == rem_t.keys()
        assert torch.equal(rem_o.values(), rem_t.values()) and torch.equal(rem_o.lengths(), rem_t.lengths())
        assert out_o.keys() == out_t.keys()
        torch.testing.assert_close(out_o.values(), out_t.values(), rtol=1e-6, atol=1e-6)
