"""EmbeddingBagCollection (torch path) against the per-feature float64 reference."""

import pytest
import torch

import jaggedrec as jr
from jaggedrec.ops import pooled_torch
from jr_testing import (assert_close, key_rows, random_configs, random_kjt, reference_pooled,
                        shuffled_keys)

DIM_SETS = [[4], [1, 3, 7], [130, 5, 64, 5], [2, 2, 16, 1, 33]]
DTYPES = {jr.DataType.FP32: torch.float32, jr.DataType.FP16: torch.float16, jr.DataType.BF16: torch.bfloat16}


def _table_grad(ebc, name):
    """The gradient of one table, read from its flat parameter's gradient."""
    view = ebc.embedding_bags[name].weight
    flat = next(p for p in ebc.parameters() if p.dtype == view.dtype)
    grad = flat.grad.to_dense() if flat.grad.is_sparse else flat.grad
    return grad[view.storage_offset():view.storage_offset() + view.numel()].view_as(view)


@pytest.fixture(params=["eager", "batched"])
def torch_path(request, monkeypatch):
    """Run on the eager CPU path, or on the host-sync-free path that compiled graphs and GPUs take."""
    if request.param == "batched":
        monkeypatch.setattr(pooled_torch, "_host_readable", lambda *tensors: False)
    return request.param


def _run_case(seed, dims, weighted, data_type=jr.DataType.FP32, batch=5, sparse=False, id_dtype=torch.int64,
              use_offsets=False, extra_key=True, one_hot=False):
    gen = torch.Generator().manual_seed(seed)
    configs = random_configs(gen, dims, data_type)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted, backend="torch", sparse=sparse)
    rows = key_rows(configs)
    keys = shuffled_keys(gen, list(rows) + (["unused"] if extra_key else []))
    rows["unused"] = 1000
    empty = [k for k in keys if k != "f0"][:1]  # one configured feature has no ids at all
    b = random_kjt(gen, keys, rows, batch, weighted=weighted, empty_keys=empty, id_dtype=id_dtype,
                   use_offsets=use_offsets, one_hot=one_hot)
    if weighted:
        b.kjt.weights().requires_grad_(True)

    out = ebc(b.kjt)
    tables64 = [ebc.embedding_bags[c.name].weight.detach().double().requires_grad_() for c in configs]
    weights64 = {k: v[2].double().requires_grad_() for k, v in b.per_key.items()} if weighted else None
    ref = reference_pooled(ebc, b, tables64, weights64)
    dtype = DTYPES[data_type]
    assert out.values().dtype == torch.float32
    assert out.keys() == [f.embedding_name for f in ebc._layout.features]
    assert_close(out.values(), ref, dtype, "forward")

    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out.values().double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for c, t64 in zip(configs, tables64):
        assert_close(_table_grad(ebc, c.name), t64.grad, dtype, f"grad of {c.name}")
    if weighted:
        # ids of keys no table reads get a zero gradient
        expected = torch.cat([torch.zeros_like(weights64[k]) if weights64[k].grad is None else weights64[k].grad
                              for k in keys])
        assert_close(b.kjt.weights().grad, expected, dtype, "grad of per-id weights")
    return ebc, out


@pytest.mark.parametrize("dims", DIM_SETS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(dims, weighted, seed, torch_path):
    _run_case(seed, dims, weighted)


@pytest.mark.parametrize("data_type", [jr.DataType.FP16, jr.DataType.BF16])
def test_half_tables(data_type, torch_path):
    _run_case(3, [3, 8, 17], weighted=True, data_type=data_type)


@pytest.mark.parametrize("dims", [[8, 8, 8], [5, 7]])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_id_per_bag(dims, weighted, torch_path):
    """One-hot features (every bag one id) take a row-gather path when all dims agree."""
    _run_case(11, dims, weighted, batch=7, one_hot=True)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("use_offsets", [False, True])
def test_id_dtypes_and_offsets_input(id_dtype, use_offsets):
    _run_case(4, [5, 9], weighted=False, id_dtype=id_dtype, use_offsets=use_offsets)


def test_batch_of_one_and_large_batch():
    _run_case(5, [3, 6], weighted=True, batch=1)
    _run_case(6, [3, 6], weighted=False, batch=64)


def test_mixed_dtypes_keep_output_order():
    gen = torch.Generator().manual_seed(7)
    configs = [
        jr.EmbeddingBagConfig(name="a", embedding_dim=3, num_embeddings=11, feature_names=["fa"]),
        jr.EmbeddingBagConfig(name="b", embedding_dim=5, num_embeddings=13, feature_names=["fb"],
                              data_type=jr.DataType.FP16, pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="c", embedding_dim=3, num_embeddings=7, feature_names=["fc", "fa"]),
    ]
    ebc = jr.EmbeddingBagCollection(configs, backend="torch")
    assert len(list(ebc.parameters())) == 2
    rows = key_rows(configs)
    b = random_kjt(gen, ["fc", "fb", "fa"], rows, 6)
    out = ebc(b.kjt)
    assert out.keys() == ["fa@a", "fb", "fc", "fa@c"]
    assert out.length_per_key() == [3, 5, 3, 3]
    assert_close(out.values(), reference_pooled(ebc, b), torch.float16)


def test_empty_batch_and_no_ids():
    configs = [jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5, feature_names=["f"])]
    ebc = jr.EmbeddingBagCollection(configs)
    empty = jr.KeyedJaggedTensor(["f"], torch.empty(0, dtype=torch.long), lengths=torch.zeros(3, dtype=torch.long))
    out = ebc(empty)
    assert out.values().shape == (3, 4) and not out.values().any()
    none = jr.KeyedJaggedTensor(["f"], torch.empty(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long))
    assert ebc(none).values().shape == (0, 4)


def test_sparse_gradients_match_dense_and_step_optimizers():
    ebc, _ = _run_case(8, [3, 4, 4], weighted=True, sparse=True)
    flat = next(ebc.parameters())
    assert flat.grad.is_sparse
    for make in (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.SparseAdam(p, lr=0.1),
                 lambda p: torch.optim.Adagrad(p, lr=0.1)):
        before = flat.detach().clone()
        make([flat]).step()
        changed = (flat.detach() != before).nonzero().flatten()
        touched = flat.grad.coalesce().indices()[0]
        assert changed.numel() > 0 and set(changed.tolist()) <= set(touched.tolist())


def test_dense_grad_steps_any_torch_optimizer():
    gen = torch.Generator().manual_seed(9)
    configs = random_configs(gen, [4, 6])
    ebc = jr.EmbeddingBagCollection(configs)
    opt = torch.optim.Adam(ebc.parameters(), lr=0.01)
    b = random_kjt(gen, key_rows(configs), key_rows(configs), 4)
    before = [p.detach().clone() for p in ebc.parameters()]
    ebc(b.kjt).values().square().sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, ebc.parameters()))


def test_deterministic_gradients():
    grads = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(10)
        configs = random_configs(gen, [8, 8])
        torch.manual_seed(0)
        ebc = jr.EmbeddingBagCollection(configs, is_weighted=True)
        b = random_kjt(gen, list(key_rows(configs)), key_rows(configs), 32, max_len=30, weighted=True)
        ebc(b.kjt).values().sum().backward()
        grads.append(next(ebc.parameters()).grad.clone())
    assert torch.equal(grads[0], grads[1])
