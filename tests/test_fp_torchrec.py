"""jaggedrec's feature processors and ``FeatureProcessedEmbeddingBagCollection`` against
TorchRec's, on the same rows and position weights (skipped as a module without TorchRec).

Both modules take the same TorchRec ``KeyedJaggedTensor`` (random, seeded: empty bags, a key
with no ids, duplicate ids, a key no table reads, shuffled keys, int32 and int64); outputs,
table gradients and position-weight gradients are compared, and each module's state_dict
loads into the other.
"""

from __future__ import annotations

import pytest

torchrec = pytest.importorskip("torchrec")

import torch  # noqa: E402
from torchrec.modules.feature_processor_ import PositionWeightedModule as TRPositionWeighted  # noqa: E402
from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection as TRCollection  # noqa: E402
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection as TRFPEBC  # noqa: E402

import jaggedrec as jr  # noqa: E402
from jaggedrec.modules.feature_processor_ import PositionWeightedModule, PositionWeightedModuleCollection  # noqa: E402
from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection  # noqa: E402
from jr_testing import random_kjt, shuffled_keys  # noqa: E402

MAX_LEN = {"f0": 6, "f1": 4, "g1": 7, "f2": 5}
ROWS = {"f0": 17, "f1": 11, "g1": 11, "f2": 17, "extra": 50}
KEYS = ["f0", "f1", "g1", "f2", "extra"]
TRITON = pytest.param("triton", marks=pytest.mark.interpret)


def _configs(lib):
    return [
        lib.EmbeddingBagConfig(name="t0", embedding_dim=5, num_embeddings=23, feature_names=["f0"]),
        lib.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=11, feature_names=["f1", "g1"]),
        lib.EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=17, feature_names=["f2"]),
    ]


def _pair(form: str, backend: str = "torch"):
    """TorchRec's module and ours, ours loaded from TorchRec's randomised state_dict."""
    tr_ebc = torchrec.EmbeddingBagCollection(tables=_configs(torchrec), is_weighted=True)
    jr_ebc = jr.EmbeddingBagCollection(_configs(jr), is_weighted=True, backend=backend)
    if form == "dict":
        tr = TRFPEBC(tr_ebc, {f: TRPositionWeighted(n) for f, n in MAX_LEN.items()})
        ours = FeatureProcessedEmbeddingBagCollection(jr_ebc, {f: PositionWeightedModule(n) for f, n in MAX_LEN.items()})
    else:  # g1 without position weights: weight 1 in both
        lengths = {f: n for f, n in MAX_LEN.items() if f != "g1"}
        tr = TRFPEBC(tr_ebc, TRCollection(lengths))
        ours = FeatureProcessedEmbeddingBagCollection(jr_ebc, PositionWeightedModuleCollection(lengths))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tr.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 2 - 0.5)
    ours.load_state_dict(tr.state_dict())
    return tr, ours


def _torchrec_kjt(batch, keys, id_dtype):
    kjt = batch.kjt
    return torchrec.KeyedJaggedTensor(keys=keys, values=kjt.values().to(id_dtype),
                                      lengths=kjt.lengths().to(id_dtype))


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("form", ["dict", "collection"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_grads_and_state_against_torchrec(backend, form, id_dtype):
    tr, ours = _pair(form, backend)
    gen = torch.Generator().manual_seed(17)
    for step, kw in enumerate([dict(), dict(empty_keys=["f1", "extra"]), dict(one_hot=True)]):
        keys = shuffled_keys(gen, KEYS)
        kjt = _torchrec_kjt(random_kjt(gen, keys, ROWS, 7, max_len=4, **kw), keys, id_dtype)
        tr.zero_grad()
        ours.zero_grad()
        expected, out = tr(kjt), ours(kjt)
        assert out.keys() == expected.keys()
        torch.testing.assert_close(out.values(), expected.values(), rtol=1e-5, atol=1e-5)
        grad = torch.randn(out.values().shape, generator=gen)
        (expected.values() * grad).sum().backward()
        (out.values() * grad).sum().backward()
        tr_grads = {n: p.grad for n, p in tr.named_parameters()}
        ours_params = dict(ours.named_parameters())
        for name, g in tr_grads.items():
            if name.startswith("_embedding_bag_collection"):
                table = name.split(".")[-2]
                view = ours.split()[1].embedding_bags[table].weight
                flat = next(p for p in ours.split()[1].parameters())
                mine = flat.grad[view.storage_offset():view.storage_offset() + view.numel()].view_as(view)
            else:
                mine = ours_params[name].grad
            expected_grad = torch.zeros_like(mine) if g is None else g
            torch.testing.assert_close(mine, expected_grad, rtol=1e-5, atol=1e-5, msg=f"{name}, batch {step}")
    # ours back into TorchRec's
    back = _pair(form)[0]
    back.load_state_dict(ours.state_dict())
    for (n, a), b in zip(back.state_dict().items(), tr.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("form", ["dict", "collection"])
def test_bag_past_max_feature_length_fails_in_both(form, backend):
    tr, ours = _pair(form, backend)
    keys = ["f0", "f1", "g1", "f2"]
    kjt = torchrec.KeyedJaggedTensor(keys=keys, values=torch.zeros(8, dtype=torch.int64),
                                     lengths=torch.tensor([1, 0, 0, 0, 0, 0, 7, 0]))  # f2: 7 ids, max 5
    with pytest.raises(RuntimeError):
        tr(kjt)
    with pytest.raises(ValueError, match="feature 'f2'"):
        ours(kjt)


def test_processors_alone_match_torchrec():
    gen = torch.Generator().manual_seed(4)
    tr_pw, pw = TRPositionWeighted(6), PositionWeightedModule(6)
    tr_pw.position_weight.data.copy_(torch.rand(6, generator=gen))
    pw.load_state_dict(tr_pw.state_dict())
    jt = torchrec.JaggedTensor(values=torch.arange(9), lengths=torch.tensor([3, 0, 6]))
    torch.testing.assert_close(pw(jt).weights(), tr_pw(jt).weights())
    tr_c, c = TRCollection({"a": 3, "b": 4}), PositionWeightedModuleCollection({"a": 3, "b": 4})
    for p in tr_c.parameters():
        p.data.copy_(torch.rand(p.shape, generator=gen))
    c.load_state_dict(tr_c.state_dict())
    kjt = torchrec.KeyedJaggedTensor(keys=["b", "x", "a"], values=torch.arange(10),
                                     lengths=torch.tensor([3, 1, 2, 0, 2, 2]))
    torch.testing.assert_close(c(kjt).weights(), tr_c(kjt).weights())
