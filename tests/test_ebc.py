"""EmbeddingBagCollection (torch path) against the per-feature float64 reference."""

import pytest
import torch

import jaggedrec as jr
from jaggedrec.ops import backends, pooled_torch
from jr_testing import assert_close, check_module, key_rows, random_configs, random_kjt, reference_pooled

DIM_SETS = [[4], [1, 3, 7], [130, 5, 64, 5], [2, 2, 16, 1, 33]]


@pytest.fixture(params=["eager-small", "eager-per-feature", "static"])
def torch_path(request, monkeypatch):
    """Run on the eager CPU path (which takes one call per dim block for small batches like
    these, and one call per feature from 4096 ids per feature up), or on the host-sync-free
    path that compiled graphs and GPUs take."""
    if request.param == "eager-per-feature":
        monkeypatch.setattr(pooled_torch, "_PER_FEATURE_MIN_IDS", 0)
    if request.param == "static":
        monkeypatch.setattr(backends, "host_readable", lambda *tensors: False)
    return request.param


def _run_case(seed, dims, weighted, **kwargs):
    return check_module(seed, dims, weighted, backend="torch", **kwargs)


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
