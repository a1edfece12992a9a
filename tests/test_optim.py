"""``jaggedrec.optim`` at TorchRec's paths: the torch-optimizer ``RowWiseAdagrad`` (against a
float64 loop, TorchRec's, and the fused row-wise Adagrad of a collection), keyed optimizers
(against TorchRec's where installed, and against the torch optimizers they wrap), and
``in_backward_optimizer_filter``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from jaggedrec.optim.optimizers import in_backward_optimizer_filter
from jaggedrec.optim.rowwise_adagrad import RowWiseAdagrad
from jr_testing import key_rows, random_kjt

SETTINGS = [
    dict(lr=0.1),
    dict(lr=0.3, eps=1e-3, lr_decay=0.2),
    dict(lr=0.05, weight_decay=0.1, initial_accumulator_value=0.5),
    dict(lr=0.2, eps=1e-6, maximize=True),
]


def _rowwise_reference(w, grads, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                       eps=1e-10, maximize=False):
    """Row-wise Adagrad in float64, one row at a time, from the formula in the module's docstring."""
    w = w.double().reshape(w.shape[0], -1).clone()
    acc = [float(initial_accumulator_value)] * w.shape[0]
    for t, grad in enumerate(grads, start=1):
        grad = grad.double().reshape(w.shape)
        rate = lr / (1 + (t - 1) * lr_decay)
        for r in range(w.shape[0]):
            g = -grad[r] if maximize else grad[r]
            g = g + weight_decay * w[r]
            acc[r] += float((g * g).sum()) / g.numel()
            w[r] = w[r] - rate * g / (acc[r] ** 0.5 + eps)
    return w


def _grads(gen, shape, steps):
    grads = [torch.randn(shape, generator=gen) for _ in range(steps)]
    for g in grads:
        g[torch.randint(0, shape[0], (2,), generator=gen)] = 0  # untouched rows
    return grads


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(s))
@pytest.mark.parametrize("shape", [(7, 5), (6, 2, 3), (5, 4, "t")], ids=["2d", "3d", "transposed"])
def test_rowwise_adagrad_matches_float64(setting, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    if shape[-1] == "t":  # a non-contiguous parameter
        p = nn.Parameter(torch.randn(shape[1], shape[0], generator=gen).t())
    else:
        p = nn.Parameter(torch.randn(shape, generator=gen))
    start = p.detach().clone()
    grads = _grads(gen, p.shape, 4)
    opt = RowWiseAdagrad([p], **setting)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _rowwise_reference(start, grads, **setting)
    torch.testing.assert_close(p.detach().double().reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["sum"].shape == (p.shape[0], 1)
    assert float(opt.state[p]["step"]) == 4.0


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(s))
def test_rowwise_adagrad_matches_torchrec(setting):
    theirs_cls = pytest.importorskip("torchrec.optim.rowwise_adagrad").RowWiseAdagrad
    gen = torch.Generator().manual_seed(3)
    ours_p = nn.Parameter(torch.randn(9, 4, generator=gen))
    theirs_p = nn.Parameter(ours_p.detach().clone())
    ours, theirs = RowWiseAdagrad([ours_p], **setting), theirs_cls([theirs_p], **setting)
    for g in _grads(gen, (9, 4), 5):
        ours_p.grad, theirs_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_p, theirs_p, rtol=0, atol=0)
    torch.testing.assert_close(ours.state[ours_p]["sum"], theirs.state[theirs_p]["sum"], rtol=0, atol=0)
    assert float(ours.state[ours_p]["step"]) == float(theirs.state[theirs_p]["step"])


def test_rowwise_adagrad_refuses_bad_input():
    p = nn.Parameter(torch.randn(4, 3))
    for bad in (dict(lr=-0.1), dict(eps=-1.0), dict(lr_decay=-1.0), dict(weight_decay=-1.0),
                dict(initial_accumulator_value=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RowWiseAdagrad([p], **bad)
    flat = nn.Parameter(torch.randn(12))
    opt = RowWiseAdagrad([p, flat], lr=0.1)  # a flat weight is taken (in-backward before sharding) ...
    flat.grad = torch.ones(12)
    with pytest.raises(ValueError, match=r"parameter 1 has shape \[12\], which has no rows"):
        opt.step()  # ... but has no rows to step
    flat.grad = None
    p.grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_rowwise_adagrad_steps_as_the_fused_one(weight_decay):
    """Dense gradients of nn.EmbeddingBag tables stepped by the torch optimizer give the
    tables the collection's fused row-wise Adagrad gives (with weight decay: batches that touch
    every row, as the fused one decays touched rows only)."""
    gen = torch.Generator().manual_seed(11)
    configs = [jr.EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=6, feature_names=["x", "y"]),
               jr.EmbeddingBagConfig(name="b", embedding_dim=3, num_embeddings=5, feature_names=["z"],
                                     pooling=jr.PoolingType.MEAN)]
    lr, eps = 0.2, 1e-3
    fused = jr.EmbeddingBagCollection(configs, fused_optimizer=optim.RowWiseAdagrad(lr, eps=eps,
                                                                                   weight_decay=weight_decay))
    tables = {c.name: nn.Parameter(fused.embedding_bags[c.name].weight.detach().clone()) for c in configs}
    dense = RowWiseAdagrad(tables.values(), lr=lr, eps=eps, weight_decay=weight_decay)
    rows = key_rows(configs)
    for _ in range(4):
        batch = random_kjt(gen, ["z", "x", "y"], rows, 6, max_len=4)
        if weight_decay:  # every row in this batch's first bags
            extra = {k: torch.arange(rows[k]) for k in ("x", "y", "z")}
            batch = random_kjt(gen, ["z", "x", "y"], rows, 6, max_len=4)
            kjt = jr.KeyedJaggedTensor.from_jt_dict({
                k: jr.JaggedTensor(torch.cat([extra[k], batch.per_key[k][0]]),
                                   lengths=torch.cat([torch.tensor([rows[k]]), batch.per_key[k][1]]))
                for k in ("z", "x", "y")})
        else:
            kjt = batch.kjt
        upstream = torch.randn(kjt.stride(), 4 + 4 + 3, generator=gen)
        (fused(kjt).values() * upstream).sum().backward()
        jt = kjt.to_dict()
        parts = []
        for c in configs:
            for f in c.feature_names:
                mode = "mean" if c.pooling == jr.PoolingType.MEAN else "sum"
                parts.append(F.embedding_bag(jt[f].values(), tables[c.name], jt[f].offsets()[:-1], mode=mode))
        dense.zero_grad()
        (torch.cat(parts, 1) * upstream).sum().backward()
        dense.step()
    for c in configs:
        torch.testing.assert_close(fused.embedding_bags[c.name].weight.detach(), tables[c.name].detach(),
                                   rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_name_serves_both():
    p = nn.Parameter(torch.randn(3, 2))
    assert isinstance(optim.RowWiseAdagrad([p], lr=0.1), RowWiseAdagrad)
    assert isinstance(optim.RowWiseAdagrad(params=[p], lr=0.1), RowWiseAdagrad)
    config = optim.RowWiseAdagrad(0.2, eps=1e-3)
    assert isinstance(config, optim.fused.RowWiseAdagrad) and (config.lr, config.eps) == (0.2, 1e-3)
    assert optim.RowWiseAdagrad(lr=0.2).lr == 0.2
    assert copy.deepcopy(config) == config
    assert optim.rowwise_adagrad.RowWiseAdagrad is RowWiseAdagrad


@pytest.mark.parametrize("source", ["rowwise_adagrad", "top_level"])
def test_in_backward_rowwise_adagrad_is_fused_by_the_sharder(source):
    cls = RowWiseAdagrad if source == "rowwise_adagrad" else optim.RowWiseAdagrad
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8,
                                                           feature_names=["f"])])
    apply_optimizer_in_backward(cls, ebc.parameters(), {"lr": 0.05, "eps": 1e-3, "weight_decay": 0.01})
    assert EmbeddingBagCollectionSharder().shard_optimizer(ebc) == optim.RowWiseAdagrad(0.05, eps=1e-3,
                                                                                         weight_decay=0.01)
    defaults = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8,
                                                                feature_names=["f"])])
    apply_optimizer_in_backward(cls, defaults.parameters(), {})
    assert EmbeddingBagCollectionSharder().shard_optimizer(defaults) == optim.RowWiseAdagrad(1e-2, eps=1e-10)
    decayed = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8,
                                                               feature_names=["f"])])
    apply_optimizer_in_backward(cls, decayed.parameters(), {"lr": 0.1, "lr_decay": 0.5})
    with pytest.raises(ValueError, match="lr_decay"):
        EmbeddingBagCollectionSharder().shard_optimizer(decayed)


# --- keyed optimizers ----------------------------------------------------------------------------

def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _train(model, opt, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4, generator=gen)).square().sum().backward()
        opt.step()


def test_keyed_wrapper_steps_and_keys_as_the_optimizer_it_wraps():
    ours_model, plain_model = _model(), _model()
    ours = KeyedOptimizerWrapper(dict(ours_model.named_parameters()), lambda ps: torch.optim.Adam(ps, lr=0.1))
    plain = torch.optim.Adam(plain_model.parameters(), lr=0.1)
    _train(ours_model, ours)
    _train(plain_model, plain)
    for a, b in zip(ours_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    names = [n for n, _ in plain_model.named_parameters()]
    state = ours.state_dict()
    assert set(state) == {"state"} and sorted(state["state"]) == sorted(names)
    for i, name in enumerate(names):
        for k, v in plain.state_dict()["state"][i].items():
            torch.testing.assert_close(state["state"][name][k], v, rtol=0, atol=0)
    ours.save_param_groups(True)
    groups = ours.state_dict()["param_groups"]
    assert groups[0]["params"] == sorted(names) and groups[0]["lr"] == 0.1


def test_keyed_load_is_strict_and_in_place():
    model = _model()
    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    _train(model, opt)
    saved = copy.deepcopy(opt.state_dict())
    held = {n: opt.state[p]["sum"] for n, p in model.named_parameters()}
    _train(model, opt, seed=5)
    opt.load_state_dict(saved)
    for name, p in model.named_parameters():
        assert opt.state[p]["sum"] is held[name]  # copied into, not replaced
        torch.testing.assert_close(held[name], saved["state"][name]["sum"], rtol=0, atol=0)
    fewer = {"state": dict(list(saved["state"].items())[:-1])}
    with pytest.raises(ValueError, match="state for 4 parameters, the state dict for 3"):
        opt.load_state_dict(fewer)
    renamed = {"state": {("x" + k): v for k, v in saved["state"].items()}}
    with pytest.raises(ValueError, match="no state for parameter '0.weight'"):
        opt.load_state_dict(renamed)
    short = copy.deepcopy(saved)
    del short["state"]["0.weight"]["sum"]
    with pytest.raises(ValueError, match="'0.weight' has"):
        opt.load_state_dict(short)
    # lazy state: load needs init_state first
    fresh_model = _model()
    fresh = KeyedOptimizerWrapper(dict(fresh_model.named_parameters()), lambda ps: torch.optim.Adam(ps, lr=0.1))
    _train(fresh_model, fresh)
    other = KeyedOptimizerWrapper(dict(_model().named_parameters()), lambda ps: torch.optim.Adam(ps, lr=0.1))
    with pytest.raises(ValueError, match="init_state"):
        other.load_state_dict(fresh.state_dict())
    other.init_state()
    other.load_state_dict(fresh.state_dict())
    for (name, p) in other.params.items():
        torch.testing.assert_close(other.state[p]["exp_avg"], fresh.state_dict()["state"][name]["exp_avg"],
                                   rtol=0, atol=0)
    with pytest.raises(NotImplementedError):
        other.add_param_group({"params": []})
    with pytest.raises(ValueError, match="not among the params"):
        KeyedOptimizer({"a": nn.Parameter(torch.ones(1))}, {nn.Parameter(torch.ones(1)): {}}, [])


def test_keyed_param_groups_round_trip():
    model = _model()
    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda ps: torch.optim.SGD(ps, lr=0.1))
    opt.save_param_groups(True)
    opt.init_state()
    saved = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.7
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.1


def test_combined_optimizer():
    model = _model()
    named = dict(model.named_parameters())
    first = KeyedOptimizerWrapper({k: v for k, v in named.items() if k.startswith("0.")},
                                  lambda ps: torch.optim.Adagrad(ps, lr=0.1))
    second = KeyedOptimizerWrapper({k: v for k, v in named.items() if k.startswith("2.")},
                                   lambda ps: torch.optim.SGD(ps, lr=0.05))
    combined = CombinedOptimizer([("first", first), second])
    assert sorted(combined.params) == ["2.bias", "2.weight", "first.0.bias", "first.0.weight"]
    assert [g["lr"] for g in combined.param_groups] == [0.1, 0.05]
    plain_model = _model()
    plain = [torch.optim.Adagrad(list(plain_model.parameters())[:2], lr=0.1),
             torch.optim.SGD(list(plain_model.parameters())[2:], lr=0.05)]
    scheduler = torch.optim.lr_scheduler.StepLR(combined, step_size=1, gamma=0.5)
    plain_schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in plain]
    gen, plain_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(3):
        combined.zero_grad()
        model(torch.randn(5, 4, generator=gen)).square().sum().backward()
        combined.step()
        scheduler.step()
        for o in plain:
            o.zero_grad()
        plain_model(torch.randn(5, 4, generator=plain_gen)).square().sum().backward()
        for o, s in zip(plain, plain_schedulers):
            o.step()
            s.step()
    for a, b in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["lr"] for g in combined.param_groups] == [0.1 / 8, 0.05 / 8]
    state = combined.state_dict()["state"]
    assert sorted(state) == ["first.0.bias", "first.0.weight"]  # SGD without momentum keeps none
    torch.testing.assert_close(state["first.0.weight"]["sum"], plain[0].state_dict()["state"][0]["sum"])
    with pytest.raises(ValueError, match="'2.weight' appears twice"):
        CombinedOptimizer([second, second])
    with pytest.raises(TypeError, match="not a KeyedOptimizer"):
        CombinedOptimizer([("raw", torch.optim.SGD(model.parameters(), lr=0.1))])


def _torchrec_pair(tr_keyed, model):
    named = dict(model.named_parameters())
    first = {k: v for k, v in named.items() if k.startswith("0.")}
    second = {k: v for k, v in named.items() if k.startswith("2.")}
    return tr_keyed.CombinedOptimizer([
        ("dense", tr_keyed.KeyedOptimizerWrapper(first, lambda ps: torch.optim.Adam(ps, lr=0.1))),
        tr_keyed.KeyedOptimizerWrapper(second, lambda ps: torch.optim.Adagrad(ps, lr=0.2))])


def test_keyed_optimizers_match_torchrec():
    tr_keyed = pytest.importorskip("torchrec.optim.keyed")
    import jaggedrec.optim.keyed as ours_keyed
    ours_model, theirs_model = _model(), _model()
    ours, theirs = _torchrec_pair(ours_keyed, ours_model), _torchrec_pair(tr_keyed, theirs_model)
    for o in (ours, theirs):
        o.save_param_groups(True)
    _train(ours_model, ours)
    _train(theirs_model, theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        for entry in a["state"][key]:
            torch.testing.assert_close(a["state"][key][entry], b["state"][key][entry], rtol=0, atol=0)
    assert a["param_groups"] == b["param_groups"]
    # each loads the other's state dict
    _train(ours_model, ours, seed=7)
    ours.load_state_dict(b)
    for key, p in ours.params.items():
        for entry, v in ours.state[p].items():
            torch.testing.assert_close(v, b["state"][key][entry], rtol=0, atol=0)


def test_in_backward_optimizer_filter():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 1))
    model[2].weight.requires_grad_(False)
    apply_optimizer_in_backward(torch.optim.SGD, model[0].parameters(), {"lr": 0.1})
    assert [n for n, _ in in_backward_optimizer_filter(model.named_parameters())] == ["1.weight", "1.bias", "2.bias"]
    assert [n for n, _ in in_backward_optimizer_filter(model.named_parameters(), include=True)] == [
        "0.weight", "0.bias", "2.weight"]
    fused = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4,
                                                             feature_names=["f"])],
                                      fused_optimizer=optim.SGD(0.1))
    holder = nn.ModuleDict({"ebc": fused, "head": nn.Linear(2, 1)})
    assert [n for n, _ in in_backward_optimizer_filter(holder.named_parameters())] == ["head.weight", "head.bias"]
    tr = pytest.importorskip("torchrec.optim.optimizers")
    plain = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    apply_optimizer_in_backward(torch.optim.SGD, plain[1].parameters(), {"lr": 0.1})
    for include in (False, True):
        assert ([n for n, _ in in_backward_optimizer_filter(plain.named_parameters(), include)]
                == [n for n, _ in tr.in_backward_optimizer_filter(plain.named_parameters(), include)])
