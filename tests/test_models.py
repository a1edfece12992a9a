"""jaggedrec.models.dlrm, jaggedrec.modules.mlp and .crossnet against explicit float64 math and
per-bag loops; no TorchRec needed (tests/test_models_torchrec.py compares with TorchRec's)."""

import math

import pytest
import torch
from torch import nn

from jaggedrec import EmbeddingBagCollection, EmbeddingBagConfig
from jaggedrec.datasets.random import RandomRecDataset
from jaggedrec.models.dlrm import (
    DLRM,
    DLRM_DCN,
    DLRM_Projection,
    DLRMTrain,
    InteractionArch,
    OverArch,
    SparseArch,
    choose,
)
from jaggedrec.modules.activation import SwishLayerNorm
from jaggedrec.modules.crossnet import (
    CrossNet,
    LowRankCrossNet,
    LowRankMixtureCrossNet,
    VectorCrossNet,
)
from jaggedrec.modules.mlp import MLP, Perceptron

F64 = torch.float64


def _tables(dim=4, device=None):
    """Three tables, the second with two features (4 features in all)."""
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t0", embedding_dim=dim, num_embeddings=11, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=7, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=dim, num_embeddings=5, feature_names=["f3"]),
    ], device=device)


def _batch(B=6, seed=0):
    return next(iter(RandomRecDataset(keys=["f0", "f1", "f2", "f3"], batch_size=B, hash_sizes=[11, 7, 7, 5],
                                      ids_per_features=[3, 2, 1, 4], num_dense=5, manual_seed=seed)))


def test_choose():
    for n in range(9):
        for k in range(-1, 11):
            assert choose(n, k) == (math.comb(n, k) if k >= 0 else 0)


def test_interaction_arch_is_the_pairwise_dot_products():
    g = torch.Generator().manual_seed(0)
    B, F, D = 3, 4, 5
    dense, sparse = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, F, D, generator=g, dtype=F64)
    out = InteractionArch(F)(dense, sparse)
    assert out.shape == (B, D + choose(F + 1, 2))
    for b in range(B):
        vecs = [dense[b]] + [sparse[b, f] for f in range(F)]
        want = list(dense[b]) + [float(vecs[i] @ vecs[j]) for i in range(F + 1) for j in range(i + 1, F + 1)]
        assert torch.allclose(out[b], torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)
    assert torch.equal(InteractionArch(0)(dense, sparse[:, :0]), dense)
    assert "triu_indices" not in InteractionArch(F).state_dict()


def _explicit_mlp(x, layers, act, last=True):
    for i, p in enumerate(layers):
        x = x @ p._linear.weight.T + (p._linear.bias if p._linear.bias is not None else 0)
        if last or i < len(layers) - 1:
            x = act(x)
    return x


@pytest.mark.parametrize("activation, act", [("relu", lambda t: t.clamp_min(0)),
                                             ("sigmoid", lambda t: 1 / (1 + torch.exp(-t))),
                                             (torch.tanh, torch.tanh)])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_is_its_layers(activation, act, bias):
    torch.manual_seed(1)
    mlp = MLP(6, [5, 3, 2], bias=bias, activation=activation, dtype=F64)
    x = torch.randn(4, 6, dtype=F64)
    assert torch.allclose(mlp(x), _explicit_mlp(x, list(mlp._mlp), act), rtol=1e-12, atol=1e-12)
    assert mlp._mlp[0]._linear.weight.dtype == F64 and (mlp._mlp[1]._linear.bias is None) == (not bias)
    linear_last = MLP(6, [5, 3], activation=activation, dtype=F64, activation_on_last=False)
    assert torch.allclose(linear_last(x), _explicit_mlp(x, list(linear_last._mlp), act, last=False), rtol=1e-12)
    assert MLP(6, [], dtype=F64)(x) is x or torch.equal(MLP(6, [], dtype=F64)(x), x)


def test_mlp_activation_forms():
    shared = nn.PReLU()
    mlp = MLP(3, [4, 4], activation=shared)
    assert mlp._mlp[0]._activation_fn is shared and mlp._mlp[1]._activation_fn is shared
    per_layer = MLP(3, [4, 4], activation=nn.ReLU)
    a, b = per_layer._mlp[0]._activation_fn, per_layer._mlp[1]._activation_fn
    assert isinstance(a, nn.ReLU) and a is not b
    factory = MLP(3, [4, 2], activation=lambda: nn.LeakyReLU(0.5))
    assert [p._activation_fn.negative_slope for p in factory._mlp] == [0.5, 0.5]
    swish = MLP(3, [4, 2], activation="swish_layernorm")
    assert [type(p._activation_fn) for p in swish._mlp] == [SwishLayerNorm, SwishLayerNorm]
    assert "_mlp.1._activation_fn.norm.0.weight" in swish.state_dict()
    x = torch.randn(5, 4)
    ln = nn.functional.layer_norm(x, (4,))
    assert torch.allclose(SwishLayerNorm(4)(x), x * torch.sigmoid(ln), atol=1e-6)
    with pytest.raises(ValueError, match="activation 'gelu' is not one of"):
        MLP(3, [4], activation="gelu")
    with pytest.raises(ValueError, match="returned int"):
        MLP(3, [4], activation=lambda: 3)
    assert Perceptron(3, 2, activation=torch.sigmoid)(torch.zeros(1, 3)).shape == (1, 2)


def _per_sample(net, x0, step):
    """Apply ``step(layer, x0, x)`` sample by sample, one column vector at a time."""
    out = []
    for b in range(x0.shape[0]):
        c0 = x0[b].unsqueeze(1)
        c = c0
        for layer in range(net._num_layers):
            c = step(layer, c0, c)
        out.append(c.squeeze(1))
    return torch.stack(out)


def test_crossnets_follow_their_formulas():
    torch.manual_seed(2)
    N, B = 6, 4
    x0 = torch.randn(B, N, dtype=F64)

    net = CrossNet(N, 3).double()
    for b in net.bias:  # nonzero biases, so that they are checked too
        nn.init.normal_(b)
    want = _per_sample(net, x0, lambda l, c0, c: c0 * (net.kernels[l] @ c + net.bias[l]) + c)
    assert torch.allclose(net(x0), want, rtol=1e-12, atol=1e-12)

    net = LowRankCrossNet(N, 2, low_rank=3).double()
    for b in net.bias:
        nn.init.normal_(b)
    assert net.W_kernels[0].shape == (N, 3) and net.V_kernels[0].shape == (3, N) and net.bias[0].shape == (N,)
    want = _per_sample(net, x0, lambda l, c0, c: c0 * (net.W_kernels[l] @ (net.V_kernels[l] @ c)
                                                       + net.bias[l].unsqueeze(1)) + c)
    assert torch.allclose(net(x0), want, rtol=1e-12, atol=1e-12)

    net = VectorCrossNet(N, 2).double()
    for b in net.bias:
        nn.init.normal_(b)
    want = _per_sample(net, x0, lambda l, c0, c: c0 * (c.T @ net.kernels[l]) + net.bias[l] + c)
    assert torch.allclose(net(x0), want, rtol=1e-12, atol=1e-12)

    for K in (1, 3):
        net = LowRankMixtureCrossNet(N, 2, num_experts=K, low_rank=2, activation=torch.tanh).double()
        for b in net.bias:
            nn.init.normal_(b)

        def step(l, c0, c, net=net, K=K):
            experts = [c0 * (net.U_kernels[l][i] @ torch.tanh(net.C_kernels[l][i] @ torch.tanh(net.V_kernels[l][i] @ c)))
                       + c0 * net.bias[l] for i in range(K)]
            if K == 1:
                return experts[0] + c
            w = torch.softmax(torch.cat([gate.weight @ c for gate in net.gates]).squeeze(1), 0)
            return sum(w[i] * experts[i] for i in range(K)) + c

        assert torch.allclose(net(x0), _per_sample(net, x0, step), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="low_rank is 0"):
        LowRankCrossNet(N, 1, low_rank=0)


def _pooled_by_loop(ebc, kjt):
    """[B, F, D] by summing each bag's rows, feature by feature in the configs' order."""
    weights = {c.name: ebc.state_dict()[f"embedding_bags.{c.name}.weight"] for c in ebc.embedding_bag_configs()}
    per_feature = []
    for c in ebc.embedding_bag_configs():
        for f in c.feature_names:
            jt = kjt[f]
            bags = torch.split(jt.values(), jt.lengths().tolist())
            per_feature.append(torch.stack([weights[c.name][ids].sum(0) if len(ids) else
                                            torch.zeros(c.embedding_dim) for ids in bags]))
    return torch.stack(per_feature, dim=1)


def test_sparse_arch_pools_each_feature():
    torch.manual_seed(3)
    ebc = _tables()
    arch = SparseArch(ebc)
    assert (arch.F, arch.D, arch.sparse_feature_names) == (4, 4, ["f0", "f1", "f2", "f3"])
    kjt = _batch().sparse_features
    assert torch.allclose(arch(kjt), _pooled_by_loop(ebc, kjt), atol=1e-6)
    # keys in another order than the tables': the output still follows the configs
    shuffled = kjt.permute([3, 1, 0, 2])
    assert torch.allclose(arch(shuffled), _pooled_by_loop(ebc, kjt), atol=1e-6)


def test_dlrm_forward_is_its_arches():
    torch.manual_seed(4)
    ebc = _tables()
    model = DLRM(ebc, 5, [6, 4], [7, 3, 1])
    batch = _batch(B=5, seed=1)
    sparse = _pooled_by_loop(ebc, batch.sparse_features).double()
    dense = _explicit_mlp(batch.dense_features.double(), [p.double() for p in model.dense_arch.model._mlp],
                          lambda t: t.clamp_min(0))
    inter = InteractionArch(4)(dense, sparse)
    top = model.over_arch.model.double()
    want = top[1](_explicit_mlp(inter, list(top[0]._mlp), lambda t: t.clamp_min(0)))
    model.float()
    got = model(batch.dense_features, batch.sparse_features)
    assert got.shape == (5, 1) and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_variants_shapes_and_meta_tables():
    torch.manual_seed(5)
    batch = _batch(B=3)
    dcn = DLRM_DCN(_tables(), 5, [6, 4], [7, 1], dcn_num_layers=2, dcn_low_rank_dim=3)
    assert dcn.inter_arch.crossnet.W_kernels[0].shape == (20, 3) and dcn.over_arch.model[0]._mlp[0]._linear.in_features == 20
    assert dcn(batch.dense_features, batch.sparse_features).shape == (3, 1)
    proj = DLRM_Projection(_tables(), 5, [6, 4], [7, 2], [9, 8], [5, 12])
    assert proj.over_arch.model[0]._mlp[0]._linear.in_features == 4 + 2 * 3
    assert proj(batch.dense_features, batch.sparse_features).shape == (3, 2)
    # the golden example's tables on meta: the dims come from the configs
    meta = DLRM(_tables(device=torch.device("meta")), 5, [6, 4], [7, 1])
    assert meta.sparse_arch.D == 4 and meta.over_arch.model[0]._mlp[0]._linear.in_features == 4 + 6 + 4
    assert not any(p.is_meta for n, p in meta.named_parameters() if not n.startswith("sparse_arch"))


def test_bad_configurations_are_named():
    mixed = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=3, feature_names=["x"]),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=3, feature_names=["y"])])
    with pytest.raises(ValueError, match="same embedding_dim.*'a': 4, 'b': 8"):
        DLRM(mixed, 5, [4], [2, 1])
    with pytest.raises(ValueError, match="dense arch's last layer size \\(6\\) must equal the embedding dim \\(4\\)"):
        DLRM(_tables(), 5, [6], [2, 1])
    with pytest.raises(ValueError, match="at least two layers"):
        OverArch(3, [1])
    with pytest.raises(ValueError, match="branch2's last layer size \\(6\\) is not a multiple"):
        DLRM_Projection(_tables(), 5, [4], [2, 1], [8], [6])


def test_dlrm_train_loss_and_in_backward_training():
    from jaggedrec.optim.keyed import KeyedOptimizerWrapper
    from jaggedrec.optim.optimizers import in_backward_optimizer_filter

    torch.manual_seed(6)
    train = DLRMTrain(DLRM(_tables(), 5, [6, 4], [7, 1]))
    batch = _batch(B=8, seed=2)
    loss, (l2, logits, labels) = train(batch)
    assert logits.shape == (8,) and labels is not None and not l2.requires_grad and not logits.requires_grad
    p = torch.sigmoid(logits.double())
    y = batch.labels.double()
    want = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert torch.allclose(loss.double(), want, rtol=1e-5) and torch.equal(l2, loss.detach())
    # trains: the dense part by a keyed Adagrad as the golden example builds it (the tables' in-backward
    # row-wise Adagrad needs a sharded model: tests/test_golden_example.py)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(train.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.1))
    assert "model.over_arch.model.1.weight" in dense.params
    first = float(loss.detach())
    for _ in range(20):
        loss, _ = train(batch)
        loss.backward()
        dense.step()
        dense.zero_grad()
    assert float(loss.detach()) < first
