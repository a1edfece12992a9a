"""jaggedrec's DLRM family, MLP, cross nets and RandomRecDataset against TorchRec's (installed in
the first CI lane; this file skips as a whole without it): the same state dict loaded both ways
(names and shapes are TorchRec's), the same outputs and gradients on the same random batches,
and the same weights and batches from the same seed."""

import pytest

torchrec = pytest.importorskip("torchrec")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchrec.datasets.random import RandomRecDataset as TRDataset  # noqa: E402
from torchrec.models import dlrm as tr_dlrm  # noqa: E402
from torchrec.modules import crossnet as tr_crossnet  # noqa: E402
from torchrec.modules import mlp as tr_mlp  # noqa: E402

import jaggedrec  # noqa: E402
from jaggedrec.datasets.random import RandomRecDataset  # noqa: E402
from jaggedrec.models import dlrm  # noqa: E402
from jaggedrec.modules import crossnet, mlp  # noqa: E402

F64 = torch.float64
KEYS = ["f0", "f1", "f2", "f3", "f4"]


def _configs(lib, dim):
    # odd sizes; one table serves two features
    return [lib.EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=13, feature_names=["f0"]),
            lib.EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=7, feature_names=["f1", "f2"]),
            lib.EmbeddingBagConfig(name="t2", embedding_dim=dim, num_embeddings=1, feature_names=["f3"]),
            lib.EmbeddingBagConfig(name="t3", embedding_dim=dim, num_embeddings=29, feature_names=["f4"])]


def _batches(n=3, B=7, seed=0, id_dtype=torch.int64):
    """Ours and TorchRec's form of the same batches: empty bags, duplicate ids, int32 or int64 ids."""
    ds = RandomRecDataset(keys=KEYS, batch_size=B, hash_sizes=[13, 7, 7, 1, 29], ids_per_features=[3, 2, 4, 2, 1],
                          num_dense=6, manual_seed=seed, num_batches=n)
    for b in ds:
        kjt = b.sparse_features
        ours = jaggedrec.KeyedJaggedTensor(kjt.keys(), kjt.values().to(id_dtype), lengths=kjt.lengths())
        theirs = torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values().to(id_dtype), lengths=kjt.lengths())
        yield b.dense_features, ours, theirs, b.labels


def _load_both_ways(ours: nn.Module, theirs: nn.Module) -> None:
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def _close(a, b, tol=1e-6):
    assert a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def test_random_rec_dataset_gives_torchrecs_batches():
    for kw in (dict(keys=KEYS, batch_size=9, hash_size=17, ids_per_feature=3, num_dense=4, manual_seed=5),
               dict(keys=KEYS[:2], batch_size=4, hash_sizes=[2, 99], ids_per_features=[0, 5], num_dense=1,
                    manual_seed=1, num_generated_batches=-1),
               dict(keys=KEYS[:3], batch_size=3, ids_per_features=[3, 1, 2], min_ids_per_features=[1, 1, 0],
                    num_dense=2, manual_seed=9, num_generated_batches=2)):
        ours, theirs = RandomRecDataset(num_batches=5, **kw), TRDataset(num_batches=5, **kw)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
            assert a.sparse_features.keys() == b.sparse_features.keys()
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
            assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_embedding_bag_collection_with_the_same_rows():
    torch.manual_seed(0)
    ours, theirs = jaggedrec.EmbeddingBagCollection(_configs(jaggedrec, 5)), torchrec.EmbeddingBagCollection(
        _configs(torchrec, 5))
    _load_both_ways(ours, theirs)
    for id_dtype in (torch.int32, torch.int64):
        for _, kjt, tkjt, _ in _batches(id_dtype=id_dtype):
            a, b = ours(kjt), theirs(tkjt)
            assert a.keys() == b.keys()
            _close(a.values(), b.values())


@pytest.mark.parametrize("kw", [dict(activation="relu"), dict(activation="sigmoid", bias=False),
                                dict(activation=torch.tanh, activation_on_last=False),
                                dict(activation=nn.SiLU), dict(activation="swish_layernorm")])
def test_mlp(kw):
    torch.manual_seed(1)
    # float32 as made (TorchRec's swish_layernorm layers ignore dtype), float64 to compare
    theirs = tr_mlp.MLP(6, [5, 4, 3], **kw)
    torch.manual_seed(1)
    ours = mlp.MLP(6, [5, 4, 3], **kw)
    same_seed = {k: torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items()}
    assert all(same_seed.values()), same_seed  # the same draws in the same order
    torch.manual_seed(2)
    for v in theirs.state_dict().values():  # weights unlike the defaults (layer norms included)
        v.copy_(torch.randn_like(v))
    _load_both_ways(ours.double(), theirs.double())
    x = torch.randn(8, 6, dtype=F64)
    _close(ours(x), theirs(x), 1e-12)


@pytest.mark.parametrize("name, args", [("CrossNet", (12, 3)), ("LowRankCrossNet", (12, 3, 4)),
                                        ("VectorCrossNet", (12, 2)), ("LowRankMixtureCrossNet", (12, 2, 1, 3)),
                                        ("LowRankMixtureCrossNet", (12, 2, 3, 2))])
def test_crossnets(name, args):
    torch.manual_seed(3)
    theirs = getattr(tr_crossnet, name)(*args)
    torch.manual_seed(3)
    ours = getattr(crossnet, name)(*args)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k
    torch.manual_seed(4)
    for v in theirs.state_dict().values():
        v.copy_(torch.randn_like(v) * 0.3)
    _load_both_ways(ours.double(), theirs.double())
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    out_ours, out_theirs = ours(x), theirs(x)
    _close(out_ours, out_theirs, 1e-12)
    g_ours, = torch.autograd.grad(out_ours.sum(), x)
    g_theirs, = torch.autograd.grad(out_theirs.sum(), x)
    _close(g_ours, g_theirs, 1e-12)


def _models(kind, lib_dlrm, lib, dim=8):
    torch.manual_seed(5)  # the tables draw as TorchRec's do, so every weight follows from the seed
    ebc = lib.EmbeddingBagCollection(_configs(lib, dim))
    common = (ebc, 6, [9, dim], [7, 4, 1])
    if kind == "DLRM":
        return lib_dlrm.DLRM(*common)
    if kind == "DLRM_DCN":
        return lib_dlrm.DLRM_DCN(*common, dcn_num_layers=2, dcn_low_rank_dim=3)
    return lib_dlrm.DLRM_Projection(*common, interaction_branch1_layer_sizes=[10, 3 * dim],
                                    interaction_branch2_layer_sizes=[5, 2 * dim])


@pytest.mark.parametrize("kind", ["DLRM", "DLRM_DCN", "DLRM_Projection"])
def test_dlrm_family(kind):
    theirs = tr_dlrm.DLRMTrain(_models(kind, tr_dlrm, torchrec))
    ours = dlrm.DLRMTrain(_models(kind, dlrm, jaggedrec))
    # from one seed, every weight is TorchRec's, the tables' included
    theirs_state = theirs.state_dict()
    assert set(ours.state_dict()) == set(theirs_state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs_state[k]), k
    _load_both_ways(ours, theirs)
    for dense, kjt, tkjt, labels in _batches(seed=6):
        _close(ours.model(dense, kjt), theirs.model(dense, tkjt), 1e-5)
        loss, (l2, logits, lab) = ours(jaggedrec.datasets.utils.Batch(dense, kjt, labels))
        tloss, (tl2, tlogits, tlab) = theirs(torchrec.datasets.utils.Batch(dense, tkjt, labels))
        _close(loss, tloss, 1e-5)
        _close(logits, tlogits, 1e-5)
        assert torch.equal(lab, tlab)
        ours.zero_grad()
        theirs.zero_grad()
        loss.backward()
        tloss.backward()
        theirs_grads = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            if "embedding_bag_collection" not in n:  # the tables' gradients: test_ebc and friends
                _close(p.grad, theirs_grads[n].grad, 1e-5)


def test_meta_tables_as_the_golden_example_builds_them():
    """The example builds its collection on meta; both libraries size the over arch from the configs."""
    ours = dlrm.DLRM(jaggedrec.EmbeddingBagCollection(_configs(jaggedrec, 4), device=torch.device("meta")),
                     6, [5, 4], [3, 1])
    theirs = tr_dlrm.DLRM(torchrec.EmbeddingBagCollection(_configs(torchrec, 4), device=torch.device("meta")),
                          6, [5, 4], [3, 1])
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if "embedding_bag" not in k}  # noqa: E731
    assert shapes(ours) == shapes(theirs)


def test_qcomm_registry_names_torchrecs_collectives():
    from torchrec.distributed import fbgemm_qcomm_codec as tr_q

    from jaggedrec.distributed import fbgemm_qcomm_codec as q

    assert [c.value for c in q.CommType] == [c.value for c in tr_q.CommType]
    assert q.get_qcomm_codecs_registry(q.QCommsConfig()) is tr_q.get_qcomm_codecs_registry(tr_q.QCommsConfig()) is None
    ours = q.get_qcomm_codecs_registry(q.QCommsConfig(q.CommType.FP16, q.CommType.BF16))
    theirs = tr_q.get_qcomm_codecs_registry(tr_q.QCommsConfig(tr_q.CommType.FP16, tr_q.CommType.BF16),
                                            device=torch.device("cpu"))
    assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("data_type", ["FP32", "FP16"])
def test_seeded_tables_and_random_state_follow_torchrecs(data_type):
    """The collections draw what TorchRec's draw (nn.EmbeddingBag's / nn.Embedding's own N(0, 1),
    then the init), so the same seed gives the same tables and leaves the generator where
    TorchRec leaves it; reset_parameters() then draws the init alone, as TorchRec's does."""
    for bag in (True, False):
        def build(lib):
            config = lib.EmbeddingBagConfig if bag else lib.EmbeddingConfig
            dims = (3, 5) if bag else (4, 4)
            tables = [config(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"],
                             data_type=getattr(lib.DataType, data_type)) for i, (d, n) in enumerate(zip(dims, (10, 37)))]
            torch.manual_seed(11)
            module = (lib.EmbeddingBagCollection if bag else lib.EmbeddingCollection)(tables=tables)
            after = torch.rand(3)
            module.reset_parameters()
            return module.state_dict(), after, torch.rand(3)

        (ours, ours_after, ours_reset), (theirs, theirs_after, theirs_reset) = build(jaggedrec), build(torchrec)
        assert set(ours) == set(theirs)
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (bag, k)
        assert torch.equal(ours_after, theirs_after) and torch.equal(ours_reset, theirs_reset)
