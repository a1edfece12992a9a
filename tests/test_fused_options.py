"""Fused optimizer options FBGEMM's CPU build does not step, against float64 references of
FBGEMM's formulas: decoupled (AdamW-style) weight decay for Adam and exact Adagrad, as
``fused_optimizer=`` configs, FBGEMM's ``fused_params`` and TorchRec's in-backward
placeholders; on every torch variant of the step (streamed, scattered, static), in the Triton
kernel under the interpreter, and compiled with fullgraph. Unsupported combinations are refused
with the option and the optimizer named.
"""

import copy

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.fused_params import fused_optimizer_from_params
from test_fused_optim import TRITON, _batches, _configs, _stream_from, use_path
from jr_testing import assert_close, reference_pooled

COUNTER = optim.RowWiseAdagrad(0.1, eps=1e-5, weight_decay=0.05, weight_decay_mode="counter",
                               counter=optim.fused.CounterRegularization(counter_weight_decay_mode="decouple",
                                                                         counter_halflife=2))
COWCLIP = optim.RowWiseAdagrad(0.1, eps=1e-5, weight_decay=0.05, weight_decay_mode="cowclip",
                               counter=optim.fused.CounterRegularization(counter_weight_decay_mode="l2",
                                                                         weight_norm_coefficient=0.1, lower_bound=0.01))
OPTIONS = {
    "adam_decoupled": optim.Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, weight_decay_mode="decouple"),
    "adagrad_decoupled": optim.Adagrad(lr=0.2, eps=1e-6, weight_decay=0.1, weight_decay_mode="decouple"),
}


def _reference_step(o, lr, t, w, g, s, touched):
    """FBGEMM's decoupled forms, float64: the state takes the bare gradient; ``w -= lr *
    (update + weight_decay * w)``."""
    if isinstance(o, optim.Adagrad):
        s["m"][touched] += g.square()
        update = g / (s["m"][touched].sqrt() + o.eps)
    else:
        b1, b2 = o.betas
        s["m"][touched] = b1 * s["m"][touched] + (1 - b1) * g
        s["v"][touched] = b2 * s["v"][touched] + (1 - b2) * g.square()
        update = s["m"][touched] / (1 - b1 ** t) / ((s["v"][touched] / (1 - b2 ** t)).sqrt() + o.eps)
    return w - lr * (update + o.weight_decay * w)


def _train(opt, backend, steps=5, dims=(4, 4, 3)):
    torch.manual_seed(0)
    configs = _configs(dims)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, fused_optimizer=opt)
    tables = [ebc.embedding_bags[c.name].weight.detach().double().clone() for c in configs]
    initial = [t.clone() for t in tables]
    state = [dict(m=torch.zeros_like(t), v=torch.zeros_like(t)) for t in tables]
    ever = [torch.zeros(t.shape[0], dtype=torch.bool) for t in tables]
    batches, gen = _batches(0, True, steps)
    for step, b in enumerate(batches, 1):
        out = ebc(b.kjt)
        upstream = torch.randn(out.values().shape, generator=gen, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in tables]
        expected = reference_pooled(ebc, b, leaves, {k: v[2].double() for k, v in b.per_key.items()})
        (expected * upstream).sum().backward()
        assert_close(out.values(), expected, what=f"forward at step {step}")
        (out.values() * upstream.float()).sum().backward()
        for i, (config, table, leaf) in enumerate(zip(configs, tables, leaves)):
            touched = torch.unique(torch.cat([b.per_key[f][0] for f in config.feature_names]))
            ever[i][touched] = True
            table[touched] = _reference_step(opt, opt.lr, step, table[touched], leaf.grad[touched], state[i], touched)
    for config, table, start, touched in zip(configs, tables, initial, ever):
        got = ebc.embedding_bags[config.name].weight.detach()
        assert_close(got, table, what=f"{opt} {config.name}")
        assert torch.equal(got[~touched].double(), start[~touched]), f"{config.name}: untouched rows"
    assert any(not m.all() for m in ever)
    return ebc


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("backend", ["torch-streamed", "torch-scattered", "torch-static", TRITON])
def test_decoupled_weight_decay_matches_float64_reference(name, backend, monkeypatch):
    ebc = _train(OPTIONS[name], use_path(monkeypatch, backend))
    if backend == "torch-streamed":  # untouched rows' state stays zero (lazy: no decay, no step)
        for key, value in ebc.fused_optimizer_state.state_dict().items():
            if value.dtype == torch.float32 and value.numel() > 16:
                assert value.isfinite().all(), key


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(OPTIONS))
def test_decoupled_weight_decay_wide_rows(name):
    """Rows past one kernel tile (130 columns)."""
    _train(OPTIONS[name], "triton", steps=3, dims=(16, 16, 130))


@pytest.mark.parametrize("name", [*OPTIONS, "counter", "cowclip"])
def test_streamed_and_scattered_steps_agree_bitwise(name, monkeypatch):
    opt = {"counter": COUNTER, "cowclip": COWCLIP}.get(name) or OPTIONS[name]

    def train(fraction):
        _stream_from(monkeypatch, fraction)
        torch.manual_seed(3)
        ebc = jr.EmbeddingBagCollection(_configs((5, 5, 3)), is_weighted=True, fused_optimizer=opt)
        batches, gen = _batches(3, True)
        for b in batches:
            out = ebc(b.kjt).values()
            out.backward(torch.randn(out.shape, generator=gen))
        return ebc.state_dict()

    whole, scattered = train(0.0), train(float("inf"))
    for key, value in whole.items():
        assert torch.equal(value, scattered[key]), key


@pytest.mark.parametrize("name", [*OPTIONS, "rowwise_adagrad", "counter"])
def test_compiled_training_with_options_has_no_graph_break(name):
    opt = {**OPTIONS, "counter": COUNTER}.get(name) or MAX_NORM[name]
    torch._dynamo.reset()
    torch.manual_seed(5)
    model = torch.nn.ModuleDict({"ebc": jr.EmbeddingBagCollection(_configs(), fused_optimizer=opt),
                                 "mlp": torch.nn.Linear(15, 1)})
    eager = copy.deepcopy(model)

    def step(m, kjt):
        return m["mlp"](m["ebc"](kjt).values()).square().mean()

    compiled = torch.compile(step, fullgraph=True)  # a graph break raises
    for b in _batches(6, False, 3)[0]:
        compiled(model, b.kjt).backward()
        step(eager, b.kjt).backward()
    for (key, a), (_, e) in zip(model["ebc"].state_dict().items(), eager["ebc"].state_dict().items()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=key)
    torch._dynamo.reset()


def test_decoupled_modes_through_fused_params_and_in_backward():
    assert fused_optimizer_from_params({"optimizer": "ADAM", "weight_decay": 0.1, "weight_decay_mode": "DECOUPLE"}) \
        == optim.Adam(0.01, eps=1e-8, weight_decay=0.1, weight_decay_mode="decouple")
    assert fused_optimizer_from_params({"optimizer": "EXACT_ADAGRAD", "weight_decay": 0.1,
                                        "weight_decay_mode": "DECOUPLE"}).weight_decay_mode == "decouple"
    assert OPTIONS["adam_decoupled"].kind != optim.Adam(0.05).kind
    assert "weight_decay_mode" not in repr(optim.Adam(0.05))  # the reprs printed before stay as they were


def test_unsupported_combinations_name_option_and_optimizer():
    with pytest.raises(ValueError, match="Adam: weight_decay_mode"):
        optim.Adam(0.1, weight_decay_mode="counter")
    with pytest.raises(ValueError, match="Adagrad: weight_decay_mode"):
        optim.Adagrad(0.1, weight_decay_mode="cowclip")
    with pytest.raises(ValueError, match="RowWiseAdagrad: weight_decay_mode 'counter' needs a counter"):
        optim.RowWiseAdagrad(0.1, weight_decay_mode="counter")
    with pytest.raises(ValueError, match="RowWiseAdagrad: weight_decay_mode 'l2' takes no counter"):
        optim.RowWiseAdagrad(0.1, counter=optim.fused.CounterRegularization())
    with pytest.raises(ValueError, match="learning_rate_mode 'tail_id_lr_increase'"):
        optim.fused.CounterRegularization(learning_rate_mode="tail_id_lr_increase")
    with pytest.raises(ValueError, match="DECOUPLE_GLOBAL is not fused by jaggedrec for EXACT_ROWWISE_ADAGRAD"):
        fused_optimizer_from_params({"optimizer": "EXACT_ROWWISE_ADAGRAD", "weight_decay_mode": "DECOUPLE_GLOBAL"})
    with pytest.raises(ValueError, match="DECOUPLE is not fused by jaggedrec for LAMB"):
        fused_optimizer_from_params({"optimizer": "LAMB", "weight_decay_mode": "DECOUPLE"})
    with pytest.raises(ValueError, match="counter_based_regularization applies to EXACT_ROWWISE_ADAGRAD only, not ADAM"):
        fused_optimizer_from_params({"optimizer": "ADAM", "counter_based_regularization": {"counter_halflife": 1}})


@pytest.mark.parametrize("opt", [COUNTER, OPTIONS["adam_decoupled"]], ids=["counter", "adam_decoupled"])
def test_checkpoint_resume_equals_straight_training(opt):
    """The counters (``<group>_counter``: prev_iter, row_counter) travel in ``state_dict()``."""
    batches, gen = _batches(3, True, 5)
    upstreams = [torch.randn(4, 15, generator=gen) for _ in batches]

    def run(ebc, steps):
        for b, up in steps:
            (ebc(b.kjt).values() * up).sum().backward()

    torch.manual_seed(1)
    straight = jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=opt)
    start = copy.deepcopy(straight.state_dict())
    run(straight, zip(batches, upstreams))
    first = jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=opt)
    first.load_state_dict(start)
    run(first, zip(batches[:2], upstreams[:2]))
    resumed = jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=opt)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    run(resumed, zip(batches[2:], upstreams[2:]))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    if opt is COUNTER:
        counters = straight.fused_optimizer_state.fp32_counter
        assert counters.shape[1] == 2 and counters[:, 1].max() > 1  # decayed counts of rows seen twice or more
        assert torch.equal(straight.fused_optimizer_state.fp32_row_counter, counters[:, 1])


MAX_NORM = {
    "sgd": optim.SGD(lr=0.5, max_norm=0.3),
    "rowwise_adagrad": optim.RowWiseAdagrad(lr=0.3, eps=1e-6, weight_decay=0.01, max_norm=0.3),
    "adam": optim.Adam(lr=0.2, betas=(0.8, 0.95), eps=1e-6, max_norm=0.25, max_gradient=2.0),
    "lamb": optim.LAMB(lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, max_norm=0.3),
}


@pytest.mark.parametrize("name", list(MAX_NORM))
@pytest.mark.parametrize("backend", ["torch-streamed", "torch-scattered", "torch-static", TRITON])
def test_max_norm_renormalises_touched_rows_after_the_step(name, backend, monkeypatch):
    """FBGEMM's max_norm, as its GPU step applies it: after the step, a touched row longer than
    max_norm is scaled to it; untouched rows (some start longer) stay bit for bit. (Against
    FBGEMM's CPU TBE, row-wise Adagrad: test_fused_options_fbgemm.py.)"""
    from test_fused_optim import Reference

    use_path(monkeypatch, backend)
    opt = MAX_NORM[name]
    torch.manual_seed(0)
    configs = _configs()
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, fused_optimizer=opt,
                                    **(dict(backend="triton") if backend == "triton" else {}))
    ref = Reference(ebc, opt, configs)
    assert any((t.norm(dim=1) > opt.max_norm).any() for t in ref.initial)
    batches, gen = _batches(0, True, 5)
    renormalised = 0
    for i, b in enumerate(batches):
        out = ebc(b.kjt)
        upstream = torch.randn(out.values().shape, generator=gen, dtype=torch.float64)
        expected = ref.step(ebc, b, upstream, opt.lr)
        assert_close(out.values(), expected, what=f"forward at step {i}")
        (out.values() * upstream.float()).sum().backward()
        for config, table in zip(configs, ref.tables):
            touched = torch.unique(torch.cat([b.per_key[f][0] for f in config.feature_names]))
            norm = table[touched].norm(dim=1, keepdim=True)
            renormalised += int((norm > opt.max_norm).sum())
            table[touched] = table[touched] * torch.where(norm > opt.max_norm, opt.max_norm / norm, 1.0)
    assert renormalised > 0
    for config, table, start, touched in zip(configs, ref.tables, ref.initial, ref.ever_touched):
        got = ebc.embedding_bags[config.name].weight.detach()
        assert_close(got, table, what=f"{name} {config.name}")
        assert torch.equal(got[~touched].double(), start[~touched]), f"{config.name}: untouched rows"
        assert (got[touched].norm(dim=1) <= opt.max_norm * (1 + 1e-6)).all()


def test_max_norm_options_and_refusals(monkeypatch):
    assert fused_optimizer_from_params({"optimizer": "EXACT_SGD", "max_norm": 0.5}) == optim.SGD(0.01, max_norm=0.5)
    assert fused_optimizer_from_params({"optimizer": "EXACT_SGD", "max_norm": 0.0}).max_norm == 0.0
    assert "max_norm" not in repr(optim.SGD(0.1)) and "max_norm=0.5" in repr(optim.SGD(0.1, max_norm=0.5))
    with pytest.raises(ValueError, match="SGD: max_norm must be >= 0"):
        optim.SGD(0.1, max_norm=-1.0)
    with pytest.raises(ValueError, match="RowWiseAdagrad: max_norm with weight_decay_mode 'counter'"):
        optim.RowWiseAdagrad(0.1, weight_decay_mode="counter", counter=optim.fused.CounterRegularization(),
                             max_norm=1.0)


@pytest.mark.parametrize("name", ["counter", "max_norm"])
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_static_step_compiled_by_inductor_matches_eager(name, monkeypatch):
    """The static-shape step (the torch backend's on GPU, traced into compiled graphs) with the
    counters and with max_norm, compiled by Inductor on CPU, against the eager step."""
    from jaggedrec.ops import pooled

    opt = COUNTER if name == "counter" else MAX_NORM["rowwise_adagrad"]
    torch._dynamo.reset()
    eager_update = pooled._fused_update_torch
    compiled_update = torch.compile(eager_update, fullgraph=True, dynamic=False)

    def train(update):
        monkeypatch.setattr(pooled, "_fused_update_torch", update)
        torch.manual_seed(11)
        ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=opt)
        batches, gen = _batches(11, True, 4)
        for b in batches:
            out = ebc(b.kjt).values()
            out.backward(torch.randn(out.shape, generator=gen))
        return ebc.state_dict()

    compiled, eager = train(compiled_update), train(eager_update)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch._dynamo.reset()


@pytest.mark.interpret
@pytest.mark.parametrize("opt", [COUNTER, COWCLIP], ids=["counter", "cowclip"])
def test_counter_kernel_matches_torch_path_on_wide_rows(opt):
    """Triton under the interpreter against the torch path, rows past one kernel tile (130
    columns: the row sums come from a first pass over the tiles), duplicate ids."""
    def train(backend):
        torch.manual_seed(4)
        ebc = jr.EmbeddingBagCollection(_configs((16, 16, 130)), is_weighted=True, backend=backend,
                                        fused_optimizer=opt)
        batches, gen = _batches(4, True, 3)
        for b in batches:
            out = ebc(b.kjt).values()
            out.backward(torch.randn(out.shape, generator=gen))
        return ebc.state_dict()

    triton, torch_path = train("triton"), train("torch")
    for key, value in torch_path.items():
        torch.testing.assert_close(triton[key], value, rtol=1e-5, atol=1e-6, msg=key)
