"""Position weights read inside the gather: ``jaggedrec::position_weighted_embedding_bags``
(the Triton forward reads an id's weight from its position in its bag; no ``[N]`` weights).

Checked against float64 autograd of the plain formula (``sum_p w[base_k + p] * table[id_p]``,
written as explicit per-bag loops), on both paths of the op (Triton under the interpreter and
torch), and through the FPEBC on the kernel path: int32/int64 ids, empty bags, keys with no
ids, a key without position weights, shuffled keys, VBE, non-contiguous inputs, fused SGD, and
bags past their key's length refused. TorchRec's FPEBC is compared in ``test_fp_torchrec.py``.
"""

from __future__ import annotations

import copy
from typing import List, Sequence

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.modules.feature_processor_ import PositionWeightedModuleCollection
from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from jaggedrec.ops import position_pooled
from jaggedrec.ops.feature_tables import FeatureTables
from jr_testing import assert_close, shuffled_keys

pytestmark = pytest.mark.interpret
BACKENDS = ["triton", "torch"]


def _batch(gen: torch.Generator, num_keys: int, bags: int, max_len: int, id_dtype, rows: int,
           empty_keys: Sequence[int] = ()):
    lengths = torch.randint(0, max_len + 1, (num_keys, bags), generator=gen)
    lengths[:, 0] = 0  # an empty bag in every key
    for k in empty_keys:
        lengths[k] = 0
    values = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
    offsets = torch.zeros(num_keys * bags + 1, dtype=torch.int64)
    offsets[1:] = lengths.reshape(-1).cumsum(0)
    return values.to(id_dtype), offsets.to(id_dtype)


def _reference(weights64: torch.Tensor, tables: FeatureTables, values, offsets, pw64, key_positions: List[int],
               mean_div: bool = True) -> torch.Tensor:
    """``[B, total_dim]`` float64 by loops: feature f pools bag b of its key with position weights."""
    bags = (offsets.shape[0] - 1) // tables.num_keys
    cols = []
    for f, key in enumerate(tables.keys):
        dim, rows = tables.dims[f], tables.rows[f]
        table = weights64[tables.weight_offsets[f]:tables.weight_offsets[f] + rows * dim].view(rows, dim)
        base, length = key_positions[2 * key], key_positions[2 * key + 1]
        out = []
        for b in range(bags):
            lo, hi = int(offsets[key * bags + b]), int(offsets[key * bags + b + 1])
            acc = torch.zeros(dim, dtype=torch.float64)
            for i in range(lo, hi):
                w = pw64[base + i - lo] if length >= 0 else 1.0
                acc = acc + w * table[int(values[i])]
            if tables.pooling[f] and mean_div:
                acc = acc / max(hi - lo, 1)
            out.append(acc)
        cols.append(torch.stack(out))
    return torch.cat(cols, dim=1)


def _setup(gen, id_dtype, pooling=(0, 0, 1, 0)):
    # 4 features over 3 keys (key 1 read twice), odd dims; key 2 has no position weights
    dims, rows = [5, 3, 8, 5], [11, 7, 13, 11]
    keys = [0, 1, 1, 3]
    starts, w = [], 0
    for d, r in zip(dims, rows):
        starts.append(w)
        w += d * r
    tables = FeatureTables(tuple(starts), tuple(rows), tuple(dims), tuple(keys), tuple(pooling), num_keys=4)
    weights = torch.randn(w, generator=gen)
    key_positions = [0, 6, 6, 4, -1, -1, 10, 5]
    pw = torch.rand(15, generator=gen) * 2 - 0.5
    return tables, weights, key_positions, pw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_op_forward_and_grads_against_float64(backend, id_dtype):
    gen = torch.Generator().manual_seed(3 + (id_dtype == torch.int32))
    tables, weights, key_positions, pw = _setup(gen, id_dtype)
    values, offsets = _batch(gen, 4, 5, 4, id_dtype, 7, empty_keys=[3])
    values[values >= 7] = 6
    w = weights.clone().requires_grad_()
    p = pw.clone().requires_grad_()
    out, bad, _ = position_pooled.position_weighted_embedding_bags(w, values, offsets, p, None, tables.encode(),
                                                                key_positions, backend, False, True, 0, [])
    w64, p64 = weights.double().requires_grad_(), pw.double().requires_grad_()
    expected = _reference(w64, tables, values, offsets, p64, key_positions)
    assert_close(out, expected, what="forward")
    assert int(bad.sum()) == 0
    grad = torch.randn(out.shape, generator=gen)
    (out * grad).sum().backward()
    (expected * grad.double()).sum().backward()
    assert_close(w.grad, w64.grad, what="table grad")
    assert_close(p.grad, p64.grad, what="position weight grad")
    assert p.grad[key_positions[6]:].abs().sum() == 0  # key 3 has no ids: no gradient


def test_triton_forward_builds_no_per_id_weights(monkeypatch):
    """The kernel path reads position weights in the loop: the [N] builder is never called,
    and the kernel is launched with POSITIONAL."""
    gen = torch.Generator().manual_seed(5)
    tables, weights, key_positions, pw = _setup(gen, torch.int64)
    values, offsets = _batch(gen, 4, 6, 4, torch.int64, 7)

    def refuse(*args, **kwargs):
        raise AssertionError("per-id weights built in the forward")

    from jaggedrec.kernels import pooled_fwd
    launched = []
    real = pooled_fwd.pooled_fwd
    monkeypatch.setattr(position_pooled, "per_id_position_weights", refuse)
    monkeypatch.setattr(position_pooled, "position_lookup", refuse)
    monkeypatch.setattr(pooled_fwd, "pooled_fwd", lambda *a, **k: launched.append(a[-2] is not None) or real(*a, **k))
    out, *_ = position_pooled.position_weighted_embedding_bags(weights, values, offsets, pw, None, tables.encode(),
                                                              key_positions, "triton", False, True, 0, [])
    assert launched == [True]
    assert_close(out, _reference(weights.double(), tables, values, offsets, pw.double(), key_positions),
                 what="forward")


def test_vbe_and_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(11)
    tables, weights, key_positions, pw = _setup(gen, torch.int64)
    values, offsets = _batch(gen, 4, 3, 4, torch.int64, 7)
    # VBE: 5 samples per feature read the 3 bag slots of their key
    inverse = torch.randint(0, 3, (4, 5), generator=gen)
    strided_values = torch.stack([values, values], 1)[:, 0]  # a non-contiguous [N] view
    strided_pw = torch.stack([pw, pw], 1)[:, 1]
    assert not strided_values.is_contiguous() and not strided_pw.is_contiguous()
    pooled = _reference(weights.double(), tables, values, offsets, pw.double(), key_positions)
    cols = torch.tensor(tables.plan.out_offsets)
    expected = torch.empty(5, pooled.shape[1], dtype=torch.float64)
    for f in range(4):
        lo, hi = int(cols[f]), int(cols[f + 1])
        expected[:, lo:hi] = pooled[inverse[f], lo:hi]
    for backend in BACKENDS:
        out, *_ = position_pooled.position_weighted_embedding_bags(
            weights, strided_values, offsets, strided_pw, inverse, tables.encode(), key_positions, backend, False,
            True, 0, [])
        assert_close(out, expected, what=f"VBE forward, {backend}")


def test_bad_key_positions_are_refused():
    gen = torch.Generator().manual_seed(1)
    tables, weights, key_positions, pw = _setup(gen, torch.int64)
    values, offsets = _batch(gen, 4, 2, 2, torch.int64, 7)
    with pytest.raises(ValueError, match="key 3's position weights"):
        position_pooled.position_weighted_embedding_bags(weights, values, offsets, pw[:12], None, tables.encode(),
                                                         key_positions, "torch", False, True, 0, [])


def _fpebc(backend: str, fused=None, seed: int = 0) -> FeatureProcessedEmbeddingBagCollection:
    torch.manual_seed(seed)
    configs = [jr.EmbeddingBagConfig(name="t0", embedding_dim=5, num_embeddings=23, feature_names=["f0"]),
               jr.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=11, feature_names=["f1", "g1"])]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, fused_optimizer=fused)
    fp = FeatureProcessedEmbeddingBagCollection(ebc, PositionWeightedModuleCollection({"f0": 5, "f1": 3}))
    with torch.no_grad():
        for name, p in fp.named_parameters():
            if "position_weights" in name:
                p.copy_(torch.rand(p.shape[0]) * 2 - 0.5)
    return fp


def _kjt(gen, keys, id_dtype=torch.int64, max_len=3):
    lengths = torch.randint(0, max_len + 1, (len(keys), 4), generator=gen)
    lengths[keys.index("f1")] = torch.tensor([0, 3, 1, 0])
    values = torch.randint(0, 11, (int(lengths.sum()),), generator=gen).to(id_dtype)
    return jr.KeyedJaggedTensor(keys, values, lengths=lengths.reshape(-1))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_fpebc_kernel_path_matches_torch_path_with_fused_sgd(id_dtype):
    """Fused SGD on the tables, torch.optim.SGD on the (dense) position weights: three steps on
    the kernel path against the torch path (which builds [N] weights), shuffled keys."""
    gen = torch.Generator().manual_seed(2)
    models = [_fpebc(b, optim.SGD(lr=0.1)) for b in ("triton", "torch")]
    # the position weights stay dense parameters, for the dense optimizer
    opts = [torch.optim.SGD([p for n, p in m.named_parameters() if "position_weights" in n], lr=0.1)
            for m in models]
    assert all(len(o.param_groups[0]["params"]) == 2 for o in opts)
    for step in range(3):
        kjt = _kjt(gen, shuffled_keys(gen, ["f0", "f1", "g1", "extra"]), id_dtype)
        outs = []
        for m, o in zip(models, opts):
            o.zero_grad()
            out = m(kjt).values()
            (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
            o.step()
            outs.append(out.detach())
        assert_close(outs[0], outs[1], what=f"step {step} output")
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert_close(a, b, what=name)


def test_fpebc_kernel_path_refuses_bags_past_max_length():
    fp = _fpebc("triton")
    kjt = jr.KeyedJaggedTensor(["f0", "f1", "g1"], torch.zeros(6, dtype=torch.int64),
                               lengths=torch.tensor([1, 0, 4, 1, 0, 0]))  # f1's bag of 4 > 3
    with pytest.raises(ValueError, match="feature 'f1' has a bag of 4 ids, longer than its max_feature_length 3"):
        fp(kjt)
    ok = jr.KeyedJaggedTensor(["f0", "f1", "g1"], torch.zeros(9, dtype=torch.int64),
                              lengths=torch.tensor([1, 0, 0, 1, 7, 0]))  # g1 has no position weights
    fp(ok)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_torch_path_pools_inside_the_op_with_the_weighted_kjts_bits(monkeypatch, id_dtype):
    """On the torch path the FPEBC builds its [N] weights inside the op, without autograd and
    without a weighted KJT, and the backward reuses the forward's gather index; forward, table
    gradients and position weight gradients are the weighted-KJT route's bit for bit (the same
    gather, the gradient summed back in id order)."""
    from jaggedrec.modules import feature_processor_
    from jaggedrec.modules.fp_embedding_modules import process_features

    gen = torch.Generator().manual_seed(4)
    fp = _fpebc("torch")
    ref = copy.deepcopy(fp)
    kjts = [_kjt(gen, shuffled_keys(gen, ["f0", "f1", "g1", "extra"]), id_dtype) for _ in range(3)]
    expected = []
    for kjt in kjts:  # the weighted-KJT route: per-id weights by autograd, then the weighted collection
        out = ref.split()[1](process_features(ref.split()[0], kjt, "ref")).values()
        (out * torch.arange(out.numel()).view(out.shape).cos()).sum().backward()
        expected.append(out.detach())

    def refuse(*args, **kwargs):
        raise AssertionError("the weighted-KJT route was taken")

    monkeypatch.setattr(feature_processor_, "position_weighted_kjt", refuse)
    for kjt, want in zip(kjts, expected):
        out = fp(kjt).values()
        with pytest.MonkeyPatch.context() as mp:  # the backward reuses the forward's gather index
            mp.setattr(position_pooled, "position_lookup", refuse)
            (out * torch.arange(out.numel()).view(out.shape).cos()).sum().backward()
        assert torch.equal(out.detach(), want)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in fp.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_kernel_backward_sums_position_grads_per_weight():
    """The kernel path's position weight gradient comes from one kernel that sums each weight's
    dots itself: no [N] per-id weights or per-id gradient are built, the sums are the same bits
    run after run, and they match float64 autograd, for a key read by two features (one MEAN),
    a key without position weights, a key with no ids, VBE and non-contiguous ids."""
    gen = torch.Generator().manual_seed(8)
    tables, weights, key_positions, pw = _setup(gen, torch.int64)
    values, offsets = _batch(gen, 4, 3, 4, torch.int64, 7, empty_keys=[3])
    inverse = torch.randint(0, 3, (4, 5), generator=gen)
    grad = torch.randn(5, tables.plan.out_offsets[-1], generator=gen)
    strided_values = torch.stack([values, values.flip(0)], 1)[:, 0]  # non-contiguous [N] ids
    from jaggedrec.kernels import pooled_bwd

    def refuse(*args, **kwargs):
        raise AssertionError("per-id weights or their gradient built")

    grads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(position_pooled, "position_lookup", refuse, raising=False)
        mp.setattr(position_pooled, "per_id_position_weights", refuse)
        mp.setattr(pooled_bwd, "psw_grad", refuse)
        for _ in range(2):
            p = pw.clone().requires_grad_()
            out, *_ = position_pooled.position_weighted_embedding_bags(weights, strided_values, offsets, p, inverse,
                                                                      tables.encode(), key_positions, "triton",
                                                                      False, True, 0, [])
            (out * grad).sum().backward()
            grads.append(p.grad)
    assert torch.equal(grads[0], grads[1])
    p64 = pw.double().requires_grad_()
    pooled = _reference(weights.double(), tables, values, offsets, p64, key_positions)
    cols = tables.plan.out_offsets
    expected = torch.cat([pooled[inverse[f], cols[f]:cols[f + 1]] for f in range(4)], dim=1)
    (expected * grad.double()).sum().backward()
    assert_close(grads[0], p64.grad, what="position weight grad")
    assert grads[0][key_positions[6]:].abs().sum() == 0  # key 3 has no ids


def test_sparse_table_gradients_take_the_weighted_kjt_route(backend="torch"):
    """sparse=True: the position op gives no sparse gradients, so the FPEBC pools a weighted KJT;
    the tables' sparse gradients and the position weights' gradients equal the dense model's."""
    gen = torch.Generator().manual_seed(6)
    models = []
    for sparse in (True, False):
        torch.manual_seed(0)
        configs = [jr.EmbeddingBagConfig(name="t0", embedding_dim=5, num_embeddings=23, feature_names=["f0"]),
                   jr.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=11, feature_names=["f1", "g1"])]
        ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, sparse=sparse)
        models.append(FeatureProcessedEmbeddingBagCollection(ebc, PositionWeightedModuleCollection({"f0": 5, "f1": 3})))
    models[1].load_state_dict(models[0].state_dict())
    with torch.no_grad():
        for m in models:
            m.split()[0].position_weights["f0"].copy_(torch.linspace(-0.5, 1.5, 5))
    kjt = _kjt(gen, ["f0", "f1", "g1"])
    for m in models:
        out = m(kjt).values()
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    params = [dict(m.named_parameters()) for m in models]
    for name, p in params[0].items():
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert_close(grad, params[1][name].grad, what=name)
    assert any(p.grad.is_sparse for p in params[0].values())
