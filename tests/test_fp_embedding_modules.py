"""Feature processors and ``FeatureProcessedEmbeddingBagCollection`` against a float64
reference of explicit per-bag loops (no TorchRec needed; ``test_fp_torchrec.py`` compares
with TorchRec's modules).

The reference walks each feature's bags and sums ``position_weight[p] * table[id]`` over
the bag's ids in float64; gradients of the tables and the position weights come from
autograd through those loops. Batches are random and seeded: empty bags, a key with no ids,
duplicate ids, an extra key no table reads, shuffled keys, int32 and int64 ids.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.feature_processor_ import (FeatureProcessor, FeatureProcessorsCollection, PositionWeightedModule,
                                                  PositionWeightedModuleCollection)
from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from jr_testing import Batch, assert_close, random_kjt, shuffled_keys, table_grad

TRITON = pytest.param("triton", marks=pytest.mark.interpret)
MAX_LEN = {"f0": 6, "f1": 4, "g1": 7, "f2": 5}


def _configs() -> List[jr.EmbeddingBagConfig]:
    # odd dims, a table read by two features, a feature (f0) read by two tables
    return [
        jr.EmbeddingBagConfig(name="t0", embedding_dim=5, num_embeddings=23, feature_names=["f0"]),
        jr.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=11, feature_names=["f1", "g1"]),
        jr.EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=17, feature_names=["f2", "f0"]),
    ]


ROWS = {"f0": 17, "f1": 11, "g1": 11, "f2": 17, "extra": 50}


def _fpebc(form: str, backend: str = "torch", seed: int = 0, **ebc_kw) -> FeatureProcessedEmbeddingBagCollection:
    torch.manual_seed(seed)
    ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=True, backend=backend, **ebc_kw)
    if form == "dict":
        processors = {f: PositionWeightedModule(n) for f, n in MAX_LEN.items()}
    else:  # g1 has no position weights: weight 1
        processors = PositionWeightedModuleCollection({f: n for f, n in MAX_LEN.items() if f != "g1"})
    fp = FeatureProcessedEmbeddingBagCollection(ebc, processors)
    with torch.no_grad():  # position weights away from 1, some negative
        for p in fp.parameters():
            if p.dim() == 1 and p.shape[0] < 10:
                p.copy_(torch.rand(p.shape[0]) * 2 - 0.5)
    return fp


def _position_weights(fp: FeatureProcessedEmbeddingBagCollection) -> Dict[str, torch.Tensor]:
    """Per feature, its position weights as a float64 leaf (absent: weight 1)."""
    out = {}
    for name, p in fp.named_parameters():
        if "_feature_processors" in name:
            key = name.split(".")[-2] if name.endswith("position_weight") else name.split(".")[-1]
            out[key] = p.detach().double().requires_grad_()
    return out


def reference(fp: FeatureProcessedEmbeddingBagCollection, batch: Batch, tables64: Dict[str, torch.Tensor],
              pw64: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, total_dim]`` float64 by explicit loops over each feature's bags."""
    outs = []
    for c in fp.embedding_bag_configs():
        for f in c.feature_names:
            values, lengths, _ = batch.per_key[f]
            rows = []
            start = 0
            for n in lengths.tolist():
                acc = torch.zeros(c.embedding_dim, dtype=torch.float64)
                for p in range(n):
                    w = pw64[f][p] if f in pw64 else 1.0
                    acc = acc + w * tables64[c.name][int(values[start + p])]
                rows.append(acc)
                start += n
            outs.append(torch.stack(rows))
    return torch.cat(outs, dim=1)


def _tables64(fp) -> Dict[str, torch.Tensor]:
    ebc = fp.split()[1]
    return {c.name: ebc.embedding_bags[c.name].weight.detach().double().requires_grad_()
            for c in ebc.embedding_bag_configs()}


def _batch(gen: torch.Generator, keys: Sequence[str], batch: int, id_dtype=torch.int64, **kw) -> Batch:
    return random_kjt(gen, keys, ROWS, batch, max_len=4, id_dtype=id_dtype, **kw)


KEYS = ["f0", "f1", "g1", "f2", "extra"]


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("form", ["dict", "collection"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_and_grads_against_loops(backend, form, id_dtype):
    gen = torch.Generator().manual_seed(7 + (id_dtype == torch.int32))
    fp = _fpebc(form, backend)
    for step, kw in enumerate([dict(), dict(empty_keys=["f1"]), dict(use_offsets=True), dict(one_hot=True)]):
        batch = _batch(gen, shuffled_keys(gen, KEYS), 6, id_dtype, weighted=step % 2 == 0, **kw)
        fp.zero_grad()
        out = fp(batch.kjt)
        tables64, pw64 = _tables64(fp), _position_weights(fp)
        expected = reference(fp, batch, tables64, pw64)
        assert_close(out.values(), expected, what=f"forward, batch {step}")
        grad = torch.randn(out.values().shape, generator=gen)
        (out.values() * grad).sum().backward()
        (expected * grad.double()).sum().backward()
        ebc = fp.split()[1]
        for name, t in tables64.items():
            assert_close(table_grad(ebc, name), t.grad, what=f"table {name} grad, batch {step}")
        params = dict(fp.named_parameters())
        for f, w in pw64.items():
            key = (f"_feature_processors.{f}.position_weight" if form == "dict"
                   else f"_feature_processors.position_weights.{f}")
            expected_grad = torch.zeros_like(w) if w.grad is None else w.grad  # a key with no ids
            assert_close(params[key].grad, expected_grad, what=f"position weight grad of {f}, batch {step}")


def test_bag_longer_than_max_feature_length_is_refused():
    fp = _fpebc("collection")
    kjt = jr.KeyedJaggedTensor(["f0", "f1", "g1", "f2"], torch.zeros(7 + 1, dtype=torch.int64),
                               lengths=torch.tensor([1, 0, 0, 0, 0, 0, 7, 0]))  # f2's 2nd bag: 7 > 5
    with pytest.raises(ValueError, match="feature 'f2' has a bag of 7 ids, longer than its max_feature_length 5"):
        fp(kjt)
    # g1 has no position weights in this form: any length is fine
    ok = jr.KeyedJaggedTensor(["f0", "f1", "g1", "f2"], torch.zeros(9, dtype=torch.int64),
                              lengths=torch.tensor([1, 0, 0, 0, 8, 0, 0, 0]))
    fp(ok)
    with pytest.raises(ValueError, match="max_feature_length 7"):
        _fpebc("dict")(ok)  # g1's bag of 8 over its 7
    pw = PositionWeightedModule(3)
    with pytest.raises(ValueError, match="bag of 4 ids"):
        pw(jr.JaggedTensor(torch.arange(5), lengths=torch.tensor([1, 4])))


def test_construction_errors():
    ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=True)
    with pytest.raises(ValueError, match=r"missing: \['g1'\]"):
        FeatureProcessedEmbeddingBagCollection(ebc, {f: PositionWeightedModule(3) for f in ["f0", "f1", "f2"]})
    with pytest.raises(ValueError, match="is_weighted=True"):
        FeatureProcessedEmbeddingBagCollection(jr.EmbeddingBagCollection(_configs()),
                                               PositionWeightedModuleCollection({"f0": 2}))
    with pytest.raises(ValueError, match="feature 'f0'"):
        PositionWeightedModuleCollection({"f0": 0})


def test_position_weighted_module_on_a_jagged_tensor():
    pw = PositionWeightedModule(4)
    with torch.no_grad():
        pw.position_weight.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
    jt = jr.JaggedTensor(torch.arange(7), lengths=torch.tensor([2, 0, 4, 1]))
    out = pw(jt)
    torch.testing.assert_close(out.weights(), torch.tensor([0.5, 2.0, 0.5, 2.0, -1.0, 3.0, 0.5]))
    assert torch.equal(out.values(), jt.values()) and torch.equal(out.lengths(), jt.lengths())
    # pre-processed: positions written into the weights, then read back
    pre = jr.JaggedTensor(torch.arange(7), lengths=torch.tensor([2, 0, 4, 1]), weights=torch.zeros(7))
    pw.pre_process_input(pre)
    torch.testing.assert_close(pre.weights(), torch.tensor([0.0, 1, 0, 1, 2, 3, 0]))
    torch.testing.assert_close(pw(pre).weights(), out.weights())


def test_collection_pre_processed_positions():
    """TorchRec's pre_process_input: positions written into the KJT's weights, then read back."""
    pwc = PositionWeightedModuleCollection({"a": 3, "b": 4})
    with torch.no_grad():
        pwc.position_weights["a"].copy_(torch.tensor([2.0, 3, 4]))
        pwc.position_weights["b"].copy_(torch.tensor([5.0, 6, 7, 8]))
    kjt = jr.KeyedJaggedTensor(["b", "c", "a"], torch.arange(9), torch.zeros(9), lengths=torch.tensor([4, 2, 3]))
    expected = torch.tensor([5.0, 6, 7, 8, 1, 1, 2, 3, 4])
    torch.testing.assert_close(pwc(kjt).weights(), expected)
    pwc.pre_process_input(kjt)
    torch.testing.assert_close(kjt.weights(), torch.tensor([0.0, 1, 2, 3, 0, 1, 0, 1, 2]))
    assert pwc.pre_processed
    torch.testing.assert_close(pwc(kjt).weights(), expected)


def test_collection_keeps_its_dict_in_step():
    pwc = PositionWeightedModuleCollection({"a": 3, "b": 2})
    pwc.load_state_dict({"position_weights.a": torch.tensor([2.0, 3, 4]),
                         "position_weights.b": torch.tensor([5.0, 6])}, assign=True)
    assert all(pwc.position_weights[k] is pwc.position_weights_dict[k] for k in "ab")
    kjt = jr.KeyedJaggedTensor(["b", "c", "a"], torch.arange(7), lengths=torch.tensor([2, 2, 3]))
    torch.testing.assert_close(pwc(kjt).weights(), torch.tensor([5.0, 6, 1, 1, 2, 3, 4]))
    pwc.to("meta")
    assert all(p.is_meta for p in pwc.position_weights_dict.values())


def test_state_dict_round_trip():
    for form in ("dict", "collection"):
        a, b = _fpebc(form, seed=1), _fpebc(form, seed=2)
        b.load_state_dict(a.state_dict())
        kjt = _batch(torch.Generator().manual_seed(3), KEYS, 5).kjt
        torch.testing.assert_close(a(kjt).values(), b(kjt).values(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_vbe_against_the_expanded_batch(backend):
    from test_vbe import random_vbe
    gen = torch.Generator().manual_seed(11)
    keys = ["f2", "f0", "g1", "f1"]
    kjt, expanded = random_vbe(gen, keys, ROWS, 6, {"f0": 1, "f1": 6, "g1": 3, "f2": 4}, empty_keys=("g1",))
    fp = _fpebc("collection", backend)
    out = fp(kjt).values()
    tables64, pw64 = _tables64(fp), _position_weights(fp)
    expected = reference(fp, expanded, tables64, pw64)
    assert_close(out, expected, what="VBE forward")
    grad = torch.randn(out.shape, generator=gen)
    (out * grad).sum().backward()
    (expected * grad.double()).sum().backward()
    params = dict(fp.named_parameters())
    for f, w in pw64.items():
        assert_close(params[f"_feature_processors.position_weights.{f}"].grad, w.grad, what=f"VBE grad of {f}")


def test_fused_tables_with_dense_position_weights():
    """Tables stepped by the fused SGD in the backward, position weights by torch.optim.SGD,
    against both stepped by hand from the float64 reference's gradients."""
    gen = torch.Generator().manual_seed(5)
    fp = _fpebc("collection", fused_optimizer=optim.SGD(lr=0.1))
    dense = [p for n, p in fp.named_parameters() if "_feature_processors" in n]
    assert len(dense) == 3
    opt = torch.optim.SGD(dense, lr=0.2)
    for step in range(3):
        batch = _batch(gen, shuffled_keys(gen, KEYS), 5)
        tables64, pw64 = _tables64(fp), _position_weights(fp)
        expected_loss = reference(fp, batch, tables64, pw64).square().sum()
        expected_loss.backward()
        opt.zero_grad()
        fp(batch.kjt).values().square().sum().backward()
        opt.step()
        ebc = fp.split()[1]
        for name, t in tables64.items():
            assert_close(ebc.embedding_bags[name].weight.detach(), t.detach() - 0.1 * t.grad, what=f"{name} {step}")
        params = dict(fp.named_parameters())
        for f, w in pw64.items():
            assert_close(params[f"_feature_processors.position_weights.{f}"].detach(), w.detach() - 0.2 * w.grad,
                         what=f"{f} step {step}")


@pytest.mark.parametrize("form,backend", [("dict", "aot_eager"), ("collection", "aot_eager"),
                                          ("collection", "inductor")])
def test_compile_without_graph_breaks(form, backend):
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(9)
    fp = _fpebc(form)  # the collection form has a key without position weights (g1): a block of ones
    eager = copy.deepcopy(fp)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fp, backend=counter)
    keys = shuffled_keys(gen, KEYS)
    for b in (4, 7, 5, 9):
        batch = _batch(gen, keys, b)
        out = compiled(batch.kjt).values()
        ref = eager(batch.kjt).values()
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        ref.sum().backward()
        for (n, p), q in zip(fp.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("form", ["dict", "collection"])
def test_fx_symbolic_trace(form):
    """TorchRec's pipelines trace the model with torch.fx: the weighting is one graph node."""
    fp = _fpebc(form)
    traced = torch.fx.symbolic_trace(fp)
    batch = _batch(torch.Generator().manual_seed(2), KEYS, 6)
    torch.testing.assert_close(traced(batch.kjt).values(), fp(batch.kjt).values(), rtol=0, atol=0)


class _Doubling(FeatureProcessor):
    """A processor of our own: every id weighs 2 times a learned scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, features: jr.JaggedTensor) -> jr.JaggedTensor:
        weights = self.scale * torch.full(features.values().shape, 2.0)
        return jr.JaggedTensor(features.values(), weights, lengths=features.lengths())


class _ScaledCollection(FeatureProcessorsCollection):
    def forward(self, features: jr.KeyedJaggedTensor) -> jr.KeyedJaggedTensor:
        return jr.KeyedJaggedTensor(features.keys(), features.values(), torch.full(features.values().shape, 3.0),
                                    lengths=features.lengths())


def test_processors_of_our_own_run_feature_by_feature():
    """Processors that are not position weights run as TorchRec runs them: a dict of
    FeatureProcessors per feature (here mixed with position weights), or one collection."""
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=True)
    processors = {f: PositionWeightedModule(n) for f, n in MAX_LEN.items()}
    processors["f1"] = _Doubling()
    fp = FeatureProcessedEmbeddingBagCollection(ebc, processors)
    batch = _batch(gen, shuffled_keys(gen, KEYS), 5)
    tables64 = _tables64(fp)
    pw64 = {f: torch.ones(n, dtype=torch.float64) for f, n in MAX_LEN.items()}
    pw64["f1"] = torch.full((4,), 3.0, dtype=torch.float64)  # every position: 2 x 1.5
    out = fp(batch.kjt).values()
    assert_close(out, reference(fp, batch, tables64, pw64), what="dict with a processor of our own")
    out.sum().backward()
    assert processors["f1"].scale.grad is not None
    scaled = FeatureProcessedEmbeddingBagCollection(ebc, _ScaledCollection())
    pw3 = {f: torch.full((8,), 3.0, dtype=torch.float64) for f in ["f0", "f1", "g1", "f2"]}
    assert_close(scaled(batch.kjt).values(), reference(scaled, batch, tables64, pw3), what="collection of our own")


@pytest.mark.parametrize("form", ["dict", "collection"])
def test_inference_runs_the_op_body_without_the_dispatcher(form, monkeypatch):
    """An eager CPU forward under no_grad pools in the op's body directly (the custom-op call
    cost ~0.05-0.09x of the pooling preset's forward); with a gradient to come it goes through
    the op, whose autograd gives the gradients. Both against the float64 loops."""
    from test_vbe import random_vbe
    from jaggedrec.ops import position_pooled
    calls = []
    op = position_pooled.position_weighted_embedding_bags

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(position_pooled, "position_weighted_embedding_bags", counted)
    gen = torch.Generator().manual_seed(21)
    fp = _fpebc(form)
    vbe, expanded = random_vbe(gen, ["f2", "f0", "g1", "f1"], ROWS, 6, {"f0": 2, "f1": 6, "g1": 3, "f2": 4})
    plain = _batch(gen, shuffled_keys(gen, KEYS), 7, torch.int32, empty_keys=["f2"])
    for what, kjt, batch in (("VBE", vbe, expanded), ("plain", plain.kjt, plain)):
        expected = reference(fp, batch, _tables64(fp), _position_weights(fp))
        with torch.no_grad():
            assert_close(fp(kjt).values(), expected, what=f"{what} forward, no_grad")
        assert not calls, "an inference forward went through the dispatcher"
        out = fp(kjt).values()
        assert_close(out, expected, what=f"{what} forward, grad enabled")
        assert len(calls) == 1 and out.requires_grad
        calls.clear()
