"""EmbeddingCollection against an independent float64 reference: one ``F.embedding`` per
feature over a float64 copy of its table, the way TorchRec's module loops over
``nn.Embedding``; and, where it is installed, against TorchRec's own module.

Batches have duplicate ids, empty bags, a feature with no ids, shuffled keys, a table read
by two features and a feature read by two tables. The Triton cases run under the
interpreter here (tiny batches), compiled on a GPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import optim
from fused_reference import reference_step
from jr_testing import TOLERANCES, assert_close, random_kjt, shuffled_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _configs(dims=(4, 3, 5), data_type=jr.DataType.FP32):
    # t1 serves two features; "x" is read by t0 and t2 (so it comes out as x@t0 and x@t2)
    return [
        jr.EmbeddingConfig(name="t0", embedding_dim=dims[0], num_embeddings=11, feature_names=["x"],
                           data_type=data_type),
        jr.EmbeddingConfig(name="t1", embedding_dim=dims[1], num_embeddings=7, feature_names=["y", "w"],
                           data_type=data_type),
        jr.EmbeddingConfig(name="t2", embedding_dim=dims[2], num_embeddings=6, feature_names=["x", "z"]),
    ]


ROWS = {"x": 6, "y": 7, "w": 7, "z": 6}


def _batch(seed, batch=4, id_dtype=torch.int64, empty=("w",), shuffle=True, max_len=4):
    gen = torch.Generator().manual_seed(seed)
    keys = ["x", "y", "w", "z"]
    if shuffle:
        keys = shuffled_keys(gen, keys)
    return random_kjt(gen, keys, ROWS, batch, max_len=max_len, empty_keys=empty, id_dtype=id_dtype), gen


def _reference(ec, batch, tables64=None):
    """Output name -> ``[N_f, dim]`` float64 rows."""
    out = {}
    for t, config in enumerate(ec.embedding_configs()):
        table = tables64[t] if tables64 is not None else ec.embeddings[config.name].weight.detach().double()
        for feature, name in zip(config.feature_names, ec.embedding_names_by_table()[t]):
            out[name] = F.embedding(batch.per_key[feature][0].long().to(table.device), table)
    return out


def _check_forward(ec, batch, exact=True):
    out = ec(batch.kjt)
    ref = _reference(ec, batch)
    assert list(out) == list(ref)
    for name, jt in out.items():
        feature = name.split("@")[0]
        assert torch.equal(jt.lengths().cpu(), batch.per_key[feature][1].to(jt.lengths().dtype)), name
        dtype = ec.embeddings[name.split("@")[-1] if "@" in name else _table_of(ec, feature)].weight.dtype
        assert jt.values().dtype == dtype, name
        if exact:  # a lookup copies rows: the same bits as the table
            assert torch.equal(jt.values().double().cpu(), ref[name].cpu()), name
        else:
            assert_close(jt.values(), ref[name], dtype, name)
    return out


def _table_of(ec, feature):
    return next(c.name for c in ec.embedding_configs() if feature in c.feature_names)


@pytest.mark.parametrize("dims", [(4, 3, 5), (1, 3, 130), (8, 8, 8)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_forward_matches_reference_torch_path(dims, id_dtype):
    torch.manual_seed(0)
    ec = jr.EmbeddingCollection(_configs(dims), backend="torch")
    for seed in range(3):
        _check_forward(ec, _batch(seed, id_dtype=id_dtype)[0])


@pytest.mark.parametrize("data_type", [jr.DataType.FP16, jr.DataType.BF16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_tables_come_out_in_their_dtype(data_type, backend):
    torch.manual_seed(1)
    ec = jr.EmbeddingCollection(_configs(data_type=data_type), backend=backend, device=DEVICE)
    out = _check_forward(ec, _batch(1, batch=3)[0])
    assert out["z"].values().dtype == torch.float32  # t2 is fp32: each table keeps its own dtype
    assert out["y"].values().dtype == data_type.to_torch()


@pytest.mark.interpret
@pytest.mark.parametrize("dims", [(4, 3, 5), (1, 3, 130)])
def test_triton_forward_matches_reference(dims):
    torch.manual_seed(2)
    ec = jr.EmbeddingCollection(_configs(dims), backend="triton", device=DEVICE)
    for seed in range(2):
        _check_forward(ec, _batch(seed, batch=3)[0])


def test_non_contiguous_and_offset_inputs():
    torch.manual_seed(3)
    ec = jr.EmbeddingCollection(_configs())
    batch, _ = _batch(4)
    kjt = batch.kjt
    strided = torch.stack([kjt.values(), torch.zeros_like(kjt.values())], dim=1)[:, 0]  # stride 2
    assert not strided.is_contiguous()
    out = ec(jr.KeyedJaggedTensor(kjt.keys(), strided, offsets=kjt.offsets()))
    ref = ec(kjt)
    for name in ref:
        assert torch.equal(out[name].values(), ref[name].values())


def _upstream(out, gen):
    return {name: torch.randn(jt.values().shape, generator=gen, dtype=torch.float64) for name, jt in out.items()}


def _reference_grads(ec, batch, upstream):
    leaves = [ec.embeddings[c.name].weight.detach().double().cpu().requires_grad_() for c in ec.embedding_configs()]
    ref = _reference(ec, batch, leaves)
    sum((ref[n] * upstream[n]).sum() for n in ref).backward()
    return {c.name: leaf.grad for c, leaf in zip(ec.embedding_configs(), leaves)}


def _loss(out, upstream):
    return sum((jt.values().double() * upstream[n].to(jt.values().device)).sum() for n, jt in out.items())


@pytest.mark.parametrize("backend,deterministic", [("torch", True), pytest.param("triton", True, marks=pytest.mark.interpret),
                                                   pytest.param("triton", False, marks=pytest.mark.interpret)])
@pytest.mark.parametrize("dims", [(4, 3, 5), (1, 3, 130)])
def test_weight_gradients_match_reference(backend, deterministic, dims):
    torch.manual_seed(4)
    ec = jr.EmbeddingCollection(_configs(dims), backend=backend, deterministic=deterministic, device=DEVICE)
    batch, gen = _batch(5, batch=3)
    out = ec(batch.kjt)
    upstream = _upstream(out, gen)
    _loss(out, upstream).backward()
    expected = _reference_grads(ec, batch, upstream)
    for t, c in enumerate(ec.embedding_configs()):
        slot = ec.layout.tables[t]
        flat = ec.flat_weights[ec.layout.groups[slot.group].name]
        grad = flat.grad.narrow(0, slot.offset, slot.rows * slot.dim).view(slot.rows, slot.dim)
        assert_close(grad.cpu(), expected[c.name], what=c.name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_sparse_gradients_equal_dense(backend):
    torch.manual_seed(5)
    dense = jr.EmbeddingCollection(_configs(), backend=backend, device=DEVICE)
    sparse = jr.EmbeddingCollection(_configs(), backend=backend, sparse=True, device=DEVICE)
    sparse.load_state_dict(dense.state_dict())
    batch, gen = _batch(6, batch=3)
    upstream = _upstream(dense(batch.kjt), gen)
    for ec in (dense, sparse):
        _loss(ec(batch.kjt), upstream).backward()
    for name, flat in sparse.flat_weights.items():
        assert flat.grad.is_sparse
        torch.testing.assert_close(flat.grad.to_dense(), dense.flat_weights[name].grad, rtol=1e-6, atol=1e-6)


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


def _reference_step(opt, tables, state, grads, touched, step):
    """One step of ``opt`` on the touched rows of float64 ``tables`` (formulas of ``jaggedrec.optim``)."""
    for name, table in tables.items():
        rows = touched[name]
        g, w, s = grads[name][rows], table[rows], state[name]
        if isinstance(opt, optim.SGD):
            table[rows] = w - opt.lr * g
            continue
        if isinstance(opt, (optim.Adagrad, optim.LarsSGD, optim.PartialRowWiseAdam, optim.LAMB)):
            table[rows] = reference_step(opt, opt.lr, step, w, g, s, rows)
            continue
        if isinstance(opt, optim.RowWiseAdagrad) and opt.weight_decay_mode == "decouple":
            s["sum_sq"][rows] += g.square().mean(1)
            table[rows] = (1 - opt.lr * opt.weight_decay) * w - opt.lr * g / (s["sum_sq"][rows].sqrt()
                                                                              + opt.eps).unsqueeze(1)
            continue
        g = g + opt.weight_decay * w
        if isinstance(opt, optim.RowWiseAdagrad):
            s["sum_sq"][rows] += g.square().mean(1)
            table[rows] = w - opt.lr * g / (s["sum_sq"][rows].sqrt() + opt.eps).unsqueeze(1)
        else:
            b1, b2 = opt.betas
            s["m"][rows] = b1 * s["m"][rows] + (1 - b1) * g
            s["v"][rows] = b2 * s["v"][rows] + (1 - b2) * g.square()
            m_hat, v_hat = s["m"][rows] / (1 - b1 ** step), s["v"][rows] / (1 - b2 ** step)
            table[rows] = w - opt.lr * m_hat / (v_hat.sqrt() + opt.eps)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_fused_optimizers_match_dense_reference(opt_name, backend):
    torch.manual_seed(6)
    opt = OPTIMIZERS[opt_name]
    ec = jr.EmbeddingCollection(_configs(), backend=backend, fused_optimizer=opt, device=DEVICE)
    tables = {c.name: ec.embeddings[c.name].weight.detach().double().cpu().clone() for c in ec.embedding_configs()}
    state = {n: dict(sum_sq=torch.zeros(t.shape[0], dtype=torch.float64), m=torch.zeros_like(t),
                     v=torch.zeros_like(t)) for n, t in tables.items()}
    for step in range(1, 4):
        batch, gen = _batch(10 + step, batch=3)
        out = ec(batch.kjt)
        upstream = _upstream(out, gen)
        leaves = {n: t.clone().requires_grad_() for n, t in tables.items()}
        ref = _reference(ec, batch, [leaves[c.name] for c in ec.embedding_configs()])
        for name in ref:
            assert_close(out[name].values().cpu(), ref[name].detach(), what=f"step {step} {name}")
        bound = opt.max_gradient  # FBGEMM's gradient clipping: each output-gradient element
        sum((ref[n] * (upstream[n] if bound is None else upstream[n].clamp(-bound, bound))).sum()
            for n in ref).backward()
        touched = {c.name: torch.unique(torch.cat([batch.per_key[f][0] for f in c.feature_names]).long())
                   for c in ec.embedding_configs()}
        _reference_step(opt, tables, state, {n: leaf.grad for n, leaf in leaves.items()}, touched, step)
        _loss(out, upstream).backward()
        for name, table in tables.items():
            assert_close(ec.embeddings[name].weight.detach().cpu(), table, what=f"step {step} {name}")


@pytest.mark.parametrize("opt_name", [n for n in OPTIMIZERS if n != "sgd"])
def test_checkpoint_resume_is_bit_exact(opt_name):
    def run(steps, ec):
        for seed in steps:
            batch, gen = _batch(seed)
            out = ec(batch.kjt)
            _loss(out, _upstream(out, gen)).backward()

    torch.manual_seed(7)
    straight = jr.EmbeddingCollection(_configs(), fused_optimizer=OPTIMIZERS[opt_name])
    resumed = copy.deepcopy(straight)
    run([20, 21, 22, 23], straight)
    run([20, 21], resumed)
    checkpoint = copy.deepcopy(resumed.state_dict())
    fresh = jr.EmbeddingCollection(_configs(), fused_optimizer=OPTIMIZERS[opt_name])
    fresh.load_state_dict(checkpoint)
    run([22, 23], fresh)
    for name, value in straight.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_need_indices_carries_the_ids_as_weights():
    ec = jr.EmbeddingCollection(_configs(), need_indices=True)
    batch, _ = _batch(8)
    out = ec(batch.kjt)
    for name, jt in out.items():
        assert torch.equal(jt.weights(), batch.per_key[name.split("@")[0]][0].to(jt.weights().dtype))
    assert jr.EmbeddingCollection(_configs())(batch.kjt)["y"].weights_or_none() is None


def test_state_dict_views_meta_and_configs():
    torch.manual_seed(9)
    ec = jr.EmbeddingCollection(_configs())
    assert list(ec.state_dict()) == ["embeddings.t0.weight", "embeddings.t1.weight", "embeddings.t2.weight"]
    with torch.no_grad():
        ec.embeddings["t1"].weight[2].fill_(0.5)  # a live view: the write reaches the flat storage
    batch, _ = _batch(9, empty=())
    assert (ec(batch.kjt)["y"].values()[batch.per_key["y"][0] == 2] == 0.5).all()
    meta = jr.EmbeddingCollection(_configs(), device="meta")
    assert meta.embeddings["t0"].weight.is_meta
    moved = meta.to_empty(device="cpu")
    moved.reset_parameters()
    weight = moved.embeddings["t0"].weight
    assert weight.abs().max() <= _configs()[0].weight_init_max and weight.std() > 0
    moved.load_state_dict(ec.state_dict())
    assert torch.equal(moved.embeddings["t2"].weight, ec.embeddings["t2"].weight)
    assert [c.name for c in ec.embedding_configs()] == ["t0", "t1", "t2"]


def test_compiled_forward_and_backward_one_graph_across_sizes():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    torch.manual_seed(10)
    ec = jr.EmbeddingCollection(_configs())
    counter = CompileCounter()
    compiled = torch.compile(ec, fullgraph=True, backend=counter)
    for seed, batch_size in [(30, 3), (31, 5), (32, 6)]:
        batch, gen = _batch(seed, batch=batch_size, shuffle=False)
        out = compiled(batch.kjt)
        ref = ec(batch.kjt)
        for name in ref:
            assert torch.equal(out[name].values(), ref[name].values()), name
        _loss(out, _upstream(out, gen)).backward()
    assert counter.frame_count <= 2  # the first batch size specialises, the next makes it dynamic
    torch._dynamo.reset()


def test_export():
    torch.manual_seed(11)
    ec = jr.EmbeddingCollection(_configs())

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ec = ec

        def forward(self, values, lengths):
            kjt = jr.KeyedJaggedTensor(["x", "y", "w", "z"], values, lengths=lengths)
            return [jt.values() for jt in self.ec(kjt).values()]

    batch, _ = _batch(12, shuffle=False)
    exported = torch.export.export(Model(), (batch.kjt.values(), batch.kjt.lengths()), strict=False)
    got = exported.module()(batch.kjt.values(), batch.kjt.lengths())
    for a, b in zip(got, Model()(batch.kjt.values(), batch.kjt.lengths())):
        assert torch.equal(a, b)


def test_bad_inputs_get_clear_errors():
    ec = jr.EmbeddingCollection(_configs())
    with pytest.raises(ValueError, match=r"missing.*'z'|\['z'\]"):
        ec(jr.KeyedJaggedTensor(["x", "y", "w"], torch.tensor([1, 2]), lengths=torch.tensor([1, 1, 0])))
    bad = jr.KeyedJaggedTensor(["x", "y", "w", "z"], torch.tensor([1, 9, 2, 3]), lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="'y'"):
        ec(bad)
    with pytest.raises(TypeError, match="EmbeddingConfig"):
        jr.EmbeddingCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3)])
    vbe = jr.KeyedJaggedTensor(["x", "y", "w", "z"], torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 0, 1, 0]),
                               stride_per_key_per_rank=[[1], [2], [1], [1]])
    with pytest.raises(ValueError, match="variable batch"):
        ec(vbe)


@pytest.mark.interpret
def test_kernels_skip_bad_ids_and_name_the_feature():
    ec = jr.EmbeddingCollection(_configs(), backend="triton", validate=False, device=DEVICE)
    bad = jr.KeyedJaggedTensor(["x", "y", "w", "z"], torch.tensor([1, 9, 2, 3], device=DEVICE),
                               lengths=torch.tensor([1, 1, 1, 1], device=DEVICE))
    with pytest.raises(ValueError, match="'y'"):
        ec(bad)
    clamp = jr.EmbeddingCollection(_configs(), backend="triton", validate=False, bounds_check="clamp", device=DEVICE)
    clamp.load_state_dict(ec.state_dict())
    out = clamp(bad)
    assert (out["y"].values() == 0).all()  # the bad id's row is skipped, as zeros
    assert torch.equal(out["x@t0"].values(), ec.embeddings["t0"].weight[1:2])


def test_matches_torchrec_embedding_collection_when_installed():
    torchrec = pytest.importorskip("torchrec")
    gen = torch.Generator().manual_seed(13)
    for trial in range(3):
        dim = int(torch.randint(1, 9, (1,), generator=gen))
        configs = [jr.EmbeddingConfig(name=f"t{i}", embedding_dim=dim,
                                      num_embeddings=int(torch.randint(3, 20, (1,), generator=gen)),
                                      feature_names=[f"f{i}"]) for i in range(3)]
        theirs = torchrec.EmbeddingCollection(tables=[torchrec.EmbeddingConfig(
            name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
            feature_names=c.feature_names) for c in configs], device=torch.device("cpu"))
        ours = jr.EmbeddingCollection(configs)
        ours.load_state_dict(theirs.state_dict())
        rows = {c.feature_names[0]: c.num_embeddings for c in configs}
        batch = random_kjt(gen, shuffled_keys(gen, list(rows)), rows, 4, max_len=3)
        kjt = batch.kjt
        their_kjt = torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths())
        mine, expected = ours(kjt), theirs(their_kjt)
        assert list(mine) == list(expected)
        upstream = {n: torch.randn(jt.values().shape, generator=gen) for n, jt in expected.items()}
        for name in expected:
            assert torch.equal(mine[name].values(), expected[name].values()), name
            assert torch.equal(mine[name].lengths(), expected[name].lengths()), name
        # one SGD step from dense gradients, on both
        for module, out in ((ours, mine), (theirs, expected)):
            sgd = torch.optim.SGD(module.parameters(), lr=0.5)
            sum((out[n].values() * upstream[n]).sum() for n in out).backward()
            sgd.step()
        for c in configs:
            torch.testing.assert_close(ours.embeddings[c.name].weight, theirs.embeddings[c.name].weight,
                                       **TOLERANCES[torch.float32])
        theirs.load_state_dict(ours.state_dict())


def test_fx_symbolic_trace_runs_on_new_batches():
    torch.manual_seed(14)
    ec = jr.EmbeddingCollection(_configs())
    graph = torch.fx.symbolic_trace(ec)
    for seed in (40, 41):  # batches of different sizes and key orders, through the one graph
        batch, _ = _batch(seed, batch=2 + seed % 3)
        got, expected = graph(batch.kjt), ec(batch.kjt)
        assert list(got) == list(expected)
        for name in expected:
            assert torch.equal(got[name].values(), expected[name].values()), name


def test_long_features_are_served_table_by_table(monkeypatch):
    """With many ids per feature the torch path calls each table on its own (no id shift):
    forward, gradients and fused steps through that path, against the same references."""
    from jaggedrec.ops import sequence_torch
    monkeypatch.setattr(sequence_torch, "_PER_FEATURE_MIN_IDS", 1)
    test_forward_matches_reference_torch_path((4, 4, 4), torch.int64)
    test_weight_gradients_match_reference("torch", True, (4, 4, 4))
    test_sparse_gradients_equal_dense("torch")
    test_fused_optimizers_match_dense_reference("adam", "torch")
