"""Fused optimizers against a float64 reference built from dense per-table gradients.

The reference pools with one F.embedding_bag per feature (see ``jr_testing``), takes dense
float64 gradients of each table, and applies the optimizer's formula by hand to the rows the
batch touched. Five steps, on batches with duplicate ids, empty bags, weights, SUM and MEAN,
and a table whose rows are read through two different keys.
"""

import copy
import math

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.ops import backends, fused_groups, fused_rows, pooled_torch
from fused_reference import reference_step
from jr_testing import assert_close, key_rows, random_kjt, reference_pooled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIMIZERS = {
    "sgd": optim.SGD(lr=0.3),
    "rowwise_adagrad": optim.RowWiseAdagrad(lr=0.2, eps=1e-6, weight_decay=0.01),
    "adam": optim.Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02),
    "adagrad": optim.Adagrad(lr=0.2, eps=1e-6, weight_decay=0.01),
    "lars_sgd": optim.LarsSGD(lr=0.3, eta=0.2, momentum=0.8, weight_decay=0.01),
    "partial_rowwise_adam": optim.PartialRowWiseAdam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02),
    "lamb": optim.LAMB(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02),
    "partial_rowwise_lamb": optim.PartialRowWiseLAMB(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02),
    "adam_clipped": optim.Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, max_gradient=0.5),
    "rowwise_adagrad_decoupled": optim.RowWiseAdagrad(lr=0.2, eps=1e-6, weight_decay=0.05, weight_decay_mode="decouple"),
}


def _configs(dims=(4, 4, 3)):
    # t_b's rows are read through key "y" and through key "x" (shared with t_a): two passes
    return [
        jr.EmbeddingBagConfig(name="t_a", embedding_dim=dims[0], num_embeddings=9, feature_names=["x"]),
        jr.EmbeddingBagConfig(name="t_b", embedding_dim=dims[1], num_embeddings=7, feature_names=["y", "x"],
                              pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="t_c", embedding_dim=dims[2], num_embeddings=5, feature_names=["z"]),
    ]


class Reference:
    """Float64 tables and optimizer state, stepped by the formulas in ``jaggedrec.optim``."""

    def __init__(self, ebc, opt, configs):
        self.opt = opt
        self.configs = configs
        self.tables = [ebc.embedding_bags[c.name].weight.detach().cpu().double().clone() for c in configs]
        self.initial = [t.clone() for t in self.tables]
        self.ever_touched = [torch.zeros(t.shape[0], dtype=torch.bool) for t in self.tables]
        self.state = [dict(sum_sq=torch.zeros(t.shape[0], dtype=torch.float64), m=torch.zeros_like(t),
                           v=torch.zeros_like(t)) for t in self.tables]
        self.step_count = 0

    def step(self, ebc, batch, upstream, lr):
        self.step_count += 1
        leaves = [t.clone().requires_grad_() for t in self.tables]
        weights64 = {k: v[2].double() for k, v in batch.per_key.items()} if batch.per_key["x"][2] is not None else None
        out = reference_pooled(ebc, batch, leaves, weights64)
        bound = self.opt.max_gradient  # FBGEMM's gradient clipping: each output-gradient element
        (out * (upstream if bound is None else upstream.clamp(-bound, bound))).sum().backward()
        for t, (config, table, leaf) in enumerate(zip(self.configs, self.tables, leaves)):
            touched = torch.unique(torch.cat([batch.per_key[f][0] for f in config.feature_names]))
            self.ever_touched[t][touched] = True
            g = leaf.grad[touched]
            w = table[touched]
            o, s = self.opt, self.state[t]
            t = self.step_count
            if isinstance(o, optim.SGD):
                table[touched] = w - lr * g
            elif isinstance(o, (optim.Adagrad, optim.LarsSGD, optim.PartialRowWiseAdam, optim.LAMB)):
                table[touched] = reference_step(o, lr, t, w, g, s, touched)
            elif isinstance(o, optim.RowWiseAdagrad) and o.weight_decay_mode == "decouple":
                s["sum_sq"][touched] += g.square().mean(1)
                step = lr / (s["sum_sq"][touched].sqrt() + o.eps).unsqueeze(1)
                table[touched] = (1 - lr * o.weight_decay) * w - step * g
            elif isinstance(o, optim.RowWiseAdagrad):
                g = g + o.weight_decay * w
                s["sum_sq"][touched] += g.square().mean(1)
                table[touched] = w - lr * g / (s["sum_sq"][touched].sqrt() + o.eps).unsqueeze(1)
            else:
                g = g + o.weight_decay * w
                b1, b2 = o.betas
                s["m"][touched] = b1 * s["m"][touched] + (1 - b1) * g
                s["v"][touched] = b2 * s["v"][touched] + (1 - b2) * g.square()
                m_hat = s["m"][touched] / (1 - b1 ** self.step_count)
                v_hat = s["v"][touched] / (1 - b2 ** self.step_count)
                table[touched] = w - lr * m_hat / (v_hat.sqrt() + o.eps)
        return out


def _batches(seed, weighted, count=5):
    gen = torch.Generator().manual_seed(seed)
    rows = key_rows(_configs())
    return [random_kjt(gen, ["z", "y", "x"], rows, 4, max_len=4, weighted=weighted) for _ in range(count)], gen


def _train(opt_name, backend, weighted, lr_schedule=None, steps=5, seed=0, dims=(4, 4, 3)):
    opt = OPTIMIZERS[opt_name]
    torch.manual_seed(seed)
    ebc = jr.EmbeddingBagCollection(_configs(dims), is_weighted=weighted, backend=backend, fused_optimizer=opt,
                                    device=DEVICE)
    ref = Reference(ebc, opt, _configs(dims))
    batches, gen = _batches(seed, weighted, steps)
    for i, b in enumerate(batches):
        lr = opt.lr if lr_schedule is None else lr_schedule[i]
        ebc.set_learning_rate(lr)
        out = ebc(b.kjt.to(torch.device(DEVICE)))
        upstream = torch.randn(out.values().shape, generator=gen, dtype=torch.float64)
        expected = ref.step(ebc, b, upstream, lr)
        assert_close(out.values().cpu(), expected, what=f"forward at step {i}")
        (out.values() * upstream.float().to(DEVICE)).sum().backward()
    return ebc, ref


TRITON = pytest.param("triton", marks=pytest.mark.interpret)


def _stream_from(monkeypatch, touched_fraction):
    """Make the eager update stream whole blocks from this fraction of touched rows on."""
    monkeypatch.setattr(fused_rows, "_STREAM_MIN_TOUCHED", dict.fromkeys(fused_rows.STATE_LAYOUT, touched_fraction))


def use_path(monkeypatch, path: str) -> str:
    """Send the fused step down ``path`` ("torch-streamed", "torch-scattered", "torch-static"
    or "triton"); the collections' backend for it."""
    if path == "torch-static":
        monkeypatch.setattr(backends, "host_readable", lambda *tensors: False)
    _stream_from(monkeypatch, 0.0 if path == "torch-streamed" else float("inf"))
    return "triton" if path == "triton" else "torch"


def _counted(fn, calls, name):
    def counting(*args):
        calls[name] += 1
        return fn(*args)
    return counting


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", ["torch", "torch-scattered", "torch-chunked", "torch-chunked-streamed",
                                     "torch-pieces", "torch-static", TRITON])
def test_fused_optimizer_matches_dense_reference(opt_name, weighted, backend, monkeypatch):
    calls = {"_step_row_range": 0, "_step_scattered_rows": 0, "_add_run_sums": 0}
    for name in calls:  # which eager update each chunk of rows took
        monkeypatch.setattr(fused_rows, name, _counted(getattr(fused_rows, name), calls, name))
    if backend == "torch-static":  # the static-shape branch that compiled graphs take
        monkeypatch.setattr(backends, "host_readable", lambda *tensors: False)
    if backend.startswith("torch-chunked"):  # a few rows at a time
        monkeypatch.setattr(fused_rows, "_CHUNK_BYTES", 48)  # 1 to 4 rows
    # eager: touched rows only (as with few ids), or every row of the block streamed
    if backend in ("torch-scattered", "torch-chunked"):
        _stream_from(monkeypatch, math.inf)
    if backend in ("torch", "torch-chunked-streamed", "torch-pieces"):
        _stream_from(monkeypatch, 0.0)
    if backend == "torch-pieces":  # each table, and each feature's bags, a piece of work on two workers
        monkeypatch.setattr(fused_groups, "_GROUP_MIN_IDS", 1)
        monkeypatch.setattr(pooled_torch, "_PER_FEATURE_MIN_IDS", 0)
    threads = torch.get_num_threads()
    if backend == "torch-pieces":
        torch.set_num_threads(2)
    try:
        ebc, ref = _train(opt_name, "triton" if backend == "triton" else "torch", weighted)
    finally:
        torch.set_num_threads(threads)
    streamed = backend in ("torch", "torch-chunked-streamed", "torch-pieces")
    expected = set() if backend in ("torch-static", "triton") else {
        "_step_row_range" if streamed else "_step_scattered_rows"}
    if streamed and opt_name == "sgd" and fused_rows._CSR_ADD:  # dims where one sparse product adds the sums
        expected = {"_add_run_sums" if fused_rows._run_sums_round_alike(d) else "_step_row_range" for d in (4, 3)}
    assert {name for name, n in calls.items() if n} == expected
    assert all(p.grad is None for p in ebc.flat_weights.values())  # no weight gradient was materialised
    assert any(not m.all() for m in ref.ever_touched)  # some rows no step touched
    for config, table, initial, touched in zip(_configs(), ref.tables, ref.initial, ref.ever_touched):
        got = ebc.embedding_bags[config.name].weight.detach().cpu()
        assert_close(got, table, what=f"{opt_name} {config.name}")
        assert torch.equal(got[~touched].double(), initial[~touched]), f"{opt_name} {config.name}: untouched rows"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("data_type", [jr.DataType.FP32, jr.DataType.FP16])
def test_row_range_and_scattered_updates_agree_bitwise(opt_name, data_type, monkeypatch):
    """The eager update steps dense chunks of rows whole and sparse ones row by row; the two
    must leave every row, touched or not, and every state value exactly alike."""
    def train(min_touched):
        _stream_from(monkeypatch, min_touched)
        torch.manual_seed(3)
        configs = _configs((5, 5, 3))
        for c in configs:
            c.data_type = data_type
        ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, fused_optimizer=OPTIMIZERS[opt_name])
        batches, gen = _batches(3, weighted=True)
        for b in batches:
            out = ebc(b.kjt).values()
            out.backward(torch.randn(out.shape, generator=gen))
        return ebc.state_dict()

    whole, scattered = train(0.0), train(math.inf)
    for name, value in whole.items():
        assert torch.equal(value, scattered[name]), name


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_fused_optimizer_wide_and_aligned_dims(opt_name, backend):
    """Dims past one kernel tile (130 > 128 columns: row-wise Adagrad needs the whole row's
    mean square before it updates), and dims of 16 and 8, which let the kernels use
    vector loads."""
    for dims in [(16, 16, 130), (16, 16, 8)]:
        ebc, ref = _train(opt_name, backend, True, steps=3, dims=dims)
        for config, table in zip(_configs(dims), ref.tables):
            assert_close(ebc.embedding_bags[config.name].weight.detach().cpu(), table, what=f"{dims} {config.name}")


@pytest.mark.interpret
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_fused_optimizer_hot_rows(opt_name, monkeypatch):
    """Triton: rows read more than LONG_RUN times in a batch get their gradient from the
    long-run kernel; with the bar at 1, the tiny batches here have both kinds of rows."""
    from jaggedrec.kernels import row_runs
    monkeypatch.setattr(row_runs, "LONG_RUN", 1)
    for dims in [(4, 4, 3), (16, 16, 130)]:
        ebc, ref = _train(opt_name, "triton", True, steps=3, dims=dims)
        for config, table in zip(_configs(dims), ref.tables):
            assert_close(ebc.embedding_bags[config.name].weight.detach().cpu(), table, what=f"{dims} {config.name}")


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_learning_rate_changes_between_steps(backend):
    ebc, ref = _train("rowwise_adagrad", backend, False, lr_schedule=[0.2, 0.1, 0.05, 0.4, 0.0])
    assert ebc.learning_rate == 0.0
    for config, table in zip(_configs(), ref.tables):
        assert_close(ebc.embedding_bags[config.name].weight.detach().cpu(), table, what=config.name)


@pytest.mark.parametrize("opt_name", [n for n in OPTIMIZERS if n != "sgd"])
def test_checkpoint_resume_equals_straight_training(opt_name):
    opt = OPTIMIZERS[opt_name]
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
    checkpoint = copy.deepcopy(first.state_dict())
    assert any(k.startswith("fused_optimizer_state.") for k in checkpoint)
    resumed = jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=opt)
    resumed.load_state_dict(checkpoint)
    run(resumed, zip(batches[2:], upstreams[2:]))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_dense_parameters_keep_their_optimizer():
    torch.manual_seed(2)
    ebc = jr.EmbeddingBagCollection(_configs(), fused_optimizer=optim.SGD(lr=0.1))
    mlp = torch.nn.Linear(15, 1)
    dense_opt = torch.optim.SGD(list(ebc.parameters()) + list(mlp.parameters()), lr=0.1)
    before = {n: p.detach().clone() for n, p in list(ebc.named_parameters()) + list(mlp.named_parameters())}
    b = _batches(4, False, 1)[0][0]
    mlp(ebc(b.kjt).values()).square().sum().backward()
    dense_opt.step()
    assert not torch.equal(mlp.weight, before["weight"])
    flat = ebc.flat_weights["fp32"]
    assert flat.grad is None  # updated by the fused step in backward, skipped by torch.optim
    assert not torch.equal(flat.detach(), before["flat_weights.fp32"])


def test_fused_optimizer_rejects_sparse_and_bad_configs():
    with pytest.raises(ValueError, match="exclude each other"):
        jr.EmbeddingBagCollection(_configs(), sparse=True, fused_optimizer=optim.SGD(lr=0.1))
    with pytest.raises(TypeError, match="jaggedrec.optim"):
        jr.EmbeddingBagCollection(_configs(), fused_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(betas=(0.9, 1.5))
    with pytest.raises(RuntimeError, match="no fused_optimizer"):
        jr.EmbeddingBagCollection(_configs()).set_learning_rate(0.1)
    assert math.isclose(jr.EmbeddingBagCollection(_configs(), fused_optimizer=optim.Adam(lr=0.25)).learning_rate, 0.25)


@pytest.mark.parametrize("opt_name", ["rowwise_adagrad"])
def test_compiled_training_with_fused_optimizer_matches_eager(opt_name):
    """EBC + MLP compiled with fullgraph=True; the fused step runs in the compiled backward."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    ebc = jr.EmbeddingBagCollection(_configs(), fused_optimizer=OPTIMIZERS[opt_name])
    model = torch.nn.ModuleDict({"ebc": ebc, "mlp": torch.nn.Linear(15, 1)})
    eager = copy.deepcopy(model)

    def step(m, kjt):
        return m["mlp"](m["ebc"](kjt).values()).square().mean()

    compiled = torch.compile(step, fullgraph=True)
    opts = [torch.optim.SGD(m["mlp"].parameters(), lr=0.1) for m in (model, eager)]
    batches, _ = _batches(6, False, 4)
    for i, b in enumerate(batches):
        if i == 2:
            for m in (model, eager):
                m["ebc"].set_learning_rate(0.05)
        for m, fn, opt in ((model, compiled, opts[0]), (eager, step, opts[1])):
            opt.zero_grad()
            fn(m, b.kjt).backward()
            opt.step()
        for (name, a), (_, e) in zip(model.state_dict().items(), eager.state_dict().items()):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=f"{name} after step {i}")
    torch._dynamo.reset()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the plan: pure
def test_static_update_compiled_matches_eager(opt_name, monkeypatch):
    """On CPU the fused update is an opaque op that runs eagerly even in compiled graphs; its
    static-shape twin serves the torch backend on GPU, traced into compiled graphs. Here that
    twin is compiled by Inductor (on CPU) and trained against the eager update."""
    from jaggedrec.ops import pooled

    torch._dynamo.reset()
    eager_update = pooled._fused_update_torch
    compiled_update = torch.compile(eager_update, fullgraph=True, dynamic=False)

    def train(update):
        monkeypatch.setattr(pooled, "_fused_update_torch", update)
        torch.manual_seed(11)
        ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=True, fused_optimizer=OPTIMIZERS[opt_name])
        batches, gen = _batches(11, weighted=True, count=4)
        for b in batches:
            out = ebc(b.kjt).values()
            out.backward(torch.randn(out.shape, generator=gen))
        return ebc.state_dict()

    compiled, eager = train(compiled_update), train(eager_update)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_fused_tables_need_no_gradient():
    """The fused step rewrites the flat weights in the backward, so they require no gradient
    (a compiled backward may mutate only such inputs); an empty trigger parameter makes
    autograd run the step. It gets an empty gradient and stays out of checkpoints."""
    torch.manual_seed(3)
    ebc = jr.EmbeddingBagCollection(_configs(), fused_optimizer=optim.SGD(lr=0.5))
    assert not any(p.requires_grad for p in ebc.flat_weights.values())
    trigger = ebc.fused_optimizer_state.backward_trigger
    assert trigger.requires_grad and trigger.numel() == 0
    assert not any("backward_trigger" in k for k in ebc.state_dict())
    before = ebc.flat_weights["fp32"].detach().clone()
    b = _batches(5, False, 1)[0][0]
    out = ebc(b.kjt).values()
    assert out.requires_grad
    out.sum().backward()
    assert trigger.grad is not None and trigger.grad.numel() == 0
    assert not torch.equal(before, ebc.flat_weights["fp32"].detach())
    with torch.no_grad():  # inference: no backward, no step
        ebc(b.kjt)
    frozen = copy.deepcopy(ebc).requires_grad_(False)  # a frozen collection takes no step
    kept = frozen.flat_weights["fp32"].detach().clone()
    assert not frozen(b.kjt).values().requires_grad
    assert torch.equal(kept, frozen.flat_weights["fp32"])
    ebc.load_state_dict(copy.deepcopy(ebc.state_dict()))  # strict: the trigger is not missing
