"""Inputs as data loaders hand them over: strided and expanded views, narrow length dtypes,
half-precision tables with large values, lengths and offsets given together, odd shapes.

Every path is checked against the float64 reference of ``jr_testing`` (one ``F.embedding_bag``
per feature over float64 tables), fed the batch's per-key tensors, which are plain and
contiguous whatever the KJT under test is made of.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.ops import backends, pooled_torch
from jr_testing import (Batch, assert_close, check_module, key_rows, random_configs, random_kjt, reference_pooled,
                        shuffled_keys, table_grad)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = pytest.param("triton", marks=pytest.mark.interpret)
# the torch path's branches: one call per dim block, one per feature, and the static one (compiled, GPU)
TORCH_PATHS = ["torch", "torch-per-feature", "torch-static"]


def _use_path(path, monkeypatch) -> str:
    if path == "torch-per-feature":
        monkeypatch.setattr(pooled_torch, "_PER_FEATURE_MIN_IDS", 0)
    if path == "torch-static":
        monkeypatch.setattr(backends, "host_readable", lambda *tensors: False)
    return "triton" if path == "triton" else "torch"


def _strided(t: torch.Tensor, how: str, junk) -> torch.Tensor:
    """``t`` as a non-contiguous view whose neighbouring elements hold ``junk``."""
    if how == "column":  # one column of an [N, 3] batch
        return torch.stack([t, torch.full_like(t, junk), torch.full_like(t, junk)], dim=1)[:, 0]
    buffer = torch.full((2 * t.numel(),), junk, dtype=t.dtype)  # every other element
    buffer[::2] = t
    return buffer[::2]


def _case(seed, weighted, batch=4, max_len=4):
    gen = torch.Generator().manual_seed(seed)
    configs = random_configs(gen, [4, 3, 4])
    rows = key_rows(configs)
    keys = shuffled_keys(gen, list(rows))
    return gen, configs, random_kjt(gen, keys, rows, batch, max_len=max_len, weighted=weighted, empty_keys=keys[:1])


def _check_against_reference(ebc, kjt, b, gen, weights_leaf=None, weights64=None):
    """Forward, table gradients and (when ``weights_leaf``) per-id-weight gradients of ``kjt``
    against the float64 reference run on ``b``'s per-key tensors."""
    configs = ebc.embedding_bag_configs()
    tables64 = [ebc.embedding_bags[c.name].weight.detach().cpu().double().requires_grad_() for c in configs]
    out = ebc(kjt.to(torch.device(DEVICE)))
    ref = reference_pooled(ebc, b, tables64, weights64)
    assert_close(out.values().cpu(), ref, what="forward")
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out.values().double() * upstream.to(DEVICE)).sum().backward()
    (ref * upstream).sum().backward()
    for c, t64 in zip(configs, tables64):
        assert_close(table_grad(ebc, c.name).cpu(), t64.grad, what=f"grad of {c.name}")
    return out


@pytest.mark.parametrize("path", TORCH_PATHS + [TRITON])
@pytest.mark.parametrize("how", ["column", "every other"])
@pytest.mark.parametrize("bags", ["lengths", "offsets"])
def test_strided_values_lengths_offsets_and_weights(path, how, bags, monkeypatch):
    """Ids, lengths (or offsets) and weights as views with junk between their elements: junk ids
    far outside every table, junk lengths that would overrun the ids, junk weights of 50."""
    backend = _use_path(path, monkeypatch)
    gen, configs, b = _case(1, weighted=True)
    kjt = b.kjt
    lengths = kjt.lengths()
    bag_kwargs = (dict(lengths=_strided(lengths, how, 3)) if bags == "lengths"
                  else dict(offsets=_strided(F.pad(lengths.cumsum(0), (1, 0)), how, 1)))
    weights = _strided(kjt.weights(), how, 50.0).requires_grad_()
    strided = jr.KeyedJaggedTensor(kjt.keys(), _strided(kjt.values(), how, 10**6), weights, **bag_kwargs)
    assert not strided.values().is_contiguous() and not weights.is_contiguous()
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, device=DEVICE)
    weights64 = {k: v[2].double().requires_grad_() for k, v in b.per_key.items()}
    _check_against_reference(ebc, strided, b, gen, weights64=weights64)
    expected = torch.cat([weights64[k].grad for k in kjt.keys()])
    assert_close(weights.grad, expected, what="grad of per-id weights")


@pytest.mark.parametrize("path", ["torch", TRITON])
def test_expanded_weights_and_lengths(path, monkeypatch):
    """Stride-0 tensors: one weight for every id, one length for every bag; the weight's
    gradient is the sum over the ids it stands for."""
    backend = _use_path(path, monkeypatch)
    gen = torch.Generator().manual_seed(2)
    configs = random_configs(gen, [5, 3])
    rows = key_rows(configs)
    keys = list(rows)
    batch, length = 3, 2
    values = torch.cat([torch.randint(0, rows[k], (batch * length,), generator=gen) for k in keys])
    weight = torch.tensor([0.75], requires_grad=True)
    kjt = jr.KeyedJaggedTensor(keys, values, weight.expand(values.numel()),
                               lengths=torch.tensor([length]).expand(len(keys) * batch))
    per_key = {k: (values[i * batch * length:(i + 1) * batch * length], torch.full((batch,), length),
                   torch.full((batch * length,), 0.75)) for i, k in enumerate(keys)}
    weights64 = {k: v[2].double().requires_grad_() for k, v in per_key.items()}
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, device=DEVICE)
    _check_against_reference(ebc, kjt, Batch(kjt, per_key), gen, weights64=weights64)
    expected = sum(w.grad.sum() for w in weights64.values())
    assert_close(weight.grad, expected.reshape(1), what="grad of the expanded weight")


@pytest.mark.interpret
@pytest.mark.parametrize("validate, bounds_check", [(False, "raise"), (False, "off"), (True, "clamp")])
def test_strided_ids_on_the_kernels_without_validation(validate, bounds_check):
    """The kernels once read strided ids as if contiguous: junk ids were skipped ("raise"
    asserted that validation had missed them) or, unchecked, read outside the tables."""
    gen, configs, b = _case(3, weighted=False)
    kjt = jr.KeyedJaggedTensor(b.kjt.keys(), _strided(b.kjt.values(), "column", 10**6),
                               lengths=_strided(b.kjt.lengths(), "every other", 3))
    ebc = jr.EmbeddingBagCollection(configs, backend="triton", validate=validate, bounds_check=bounds_check,
                                    device=DEVICE)
    _check_against_reference(ebc, kjt, b, gen)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_strided_inputs_for_sparse_and_fused_gradients(backend):
    """Sparse gradients and the fused step read the ids and weights again in the backward."""
    gen, configs, b = _case(4, weighted=True)
    kjt = b.kjt
    strided = jr.KeyedJaggedTensor(kjt.keys(), _strided(kjt.values(), "column", 10**6),
                                   _strided(kjt.weights(), "every other", 50.0),
                                   lengths=_strided(kjt.lengths(), "column", 3))
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, sparse=True, device=DEVICE)
    _check_against_reference(ebc, strided, b, gen, weights64={k: v[2].double() for k, v in b.per_key.items()})
    # fused: the same step from a contiguous twin of the batch (checked against the float64
    # optimizer reference in test_fused_optim) and from the strided one
    torch.manual_seed(0)
    fused = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, device=DEVICE,
                                      fused_optimizer=optim.RowWiseAdagrad(lr=0.5))
    twin = copy.deepcopy(fused)
    before = fused.flat_weights["fp32"].detach().clone()
    upstream = torch.randn(kjt.stride(), sum(c.embedding_dim * c.num_features() for c in configs), generator=gen)
    (fused(strided.to(torch.device(DEVICE))).values() * upstream).sum().backward()
    (twin(kjt.to(torch.device(DEVICE))).values() * upstream).sum().backward()
    assert not torch.equal(fused.flat_weights["fp32"], before)  # the step happened
    for name, value in twin.state_dict().items():
        assert_close(fused.state_dict()[name], value, what=name)


FUSED = {"sgd": optim.SGD(lr=1.0), "rowwise_adagrad": optim.RowWiseAdagrad(lr=0.5),
         "adam": optim.Adam(lr=0.3)}


@pytest.mark.parametrize("opt_name", list(FUSED))
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_per_id_weight_gradient_under_a_fused_optimizer(opt_name, backend):
    """d(loss)/d(weight of id i) is the row of id i as the forward read it, dotted with its bag's
    output gradient: the fused step, which rewrites those rows in the backward, must come after."""
    gen, configs, b = _case(5, weighted=True)
    torch.manual_seed(1)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, device=DEVICE,
                                    fused_optimizer=FUSED[opt_name])
    tables64 = [ebc.embedding_bags[c.name].weight.detach().cpu().double() for c in configs]
    weights = b.kjt.weights().clone().requires_grad_()
    kjt = jr.KeyedJaggedTensor(b.kjt.keys(), b.kjt.values(), weights, lengths=b.kjt.lengths())
    weights64 = {k: v[2].double().requires_grad_() for k, v in b.per_key.items()}
    ref = reference_pooled(ebc, b, tables64, weights64)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ebc(kjt.to(torch.device(DEVICE))).values().double() * upstream.to(DEVICE)).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(weights.grad, torch.cat([weights64[k].grad for k in kjt.keys()]), what="grad of per-id weights")
    assert not torch.equal(ebc.embedding_bags[configs[0].name].weight.detach().cpu().double(), tables64[0])


def test_per_id_weight_gradient_under_a_fused_optimizer_compiled():
    torch._dynamo.reset()
    gen, configs, b = _case(6, weighted=True)
    torch.manual_seed(2)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend="torch", fused_optimizer=optim.SGD(lr=1.0))
    tables64 = [ebc.embedding_bags[c.name].weight.detach().double() for c in configs]
    compiled = torch.compile(ebc, fullgraph=True)
    weights = b.kjt.weights().clone().requires_grad_()
    kjt = jr.KeyedJaggedTensor(b.kjt.keys(), b.kjt.values(), weights, lengths=b.kjt.lengths())
    weights64 = {k: v[2].double().requires_grad_() for k, v in b.per_key.items()}
    ref = reference_pooled(ebc, b, tables64, weights64)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (compiled(kjt).values().double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(weights.grad, torch.cat([weights64[k].grad for k in kjt.keys()]), what="grad of per-id weights")
    torch._dynamo.reset()


@pytest.mark.parametrize("path", TORCH_PATHS + [TRITON])
@pytest.mark.parametrize("lengths_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_length_dtypes(path, lengths_dtype, monkeypatch):
    """Bags of 100 and 120 ids: as uint8, their offsets once summed to 220 - 256 = -36."""
    backend = _use_path(path, monkeypatch)
    gen = torch.Generator().manual_seed(7)
    configs = [jr.EmbeddingBagConfig(name="t", embedding_dim=3, num_embeddings=50, feature_names=["f"])]
    lengths = torch.tensor([100, 0, 120])
    values = torch.randint(0, 50, (220,), generator=gen)
    kjt = jr.KeyedJaggedTensor(["f"], values, lengths=lengths.to(lengths_dtype))
    assert kjt.offsets().tolist() == [0, 100, 100, 220] and kjt.offsets().dtype in (torch.int32, torch.int64)
    assert kjt.length_per_key() == [220]
    for validate in (True, False):
        ebc = jr.EmbeddingBagCollection(configs, backend=backend, validate=validate, device=DEVICE)
        _check_against_reference(ebc, kjt, Batch(kjt, {"f": (values, lengths, None)}), gen)


def test_narrow_length_dtypes_in_jagged_tensors():
    jt = jr.JaggedTensor(torch.arange(400), lengths=torch.tensor([200, 200], dtype=torch.uint8))
    assert jt.offsets().tolist() == [0, 200, 400]
    assert [t.numel() for t in jt.to_dense()] == [200, 200]
    narrow = jr.KeyedJaggedTensor(["a", "b"], torch.arange(300), lengths=torch.tensor([150, 150], dtype=torch.uint8))
    assert narrow["b"].offsets().tolist() == [0, 150] and narrow.offset_per_key() == [0, 150, 300]


def _pool64(table: torch.Tensor, ids, lengths, psw) -> torch.Tensor:
    """``[B, D]`` float64 weighted bag sums, written out by hand."""
    rows, start = [], 0
    for n in lengths:
        rows.append(sum((psw[i] * table[ids[i]].double() for i in range(start, start + n)),
                        torch.zeros(table.shape[1], dtype=torch.float64)))
        start += n
    return torch.stack(rows)


# rows that a sum in the table's dtype gets wrong: fp16 overflows past 65504 (40000 + 40000),
# bf16 has 8 bits of mantissa (1 + 2**-8 rounds to 1), and weights are fp32 (1 + 2**-8 too)
HALF_ROWS = {jr.DataType.FP16: (40000.0, 40000.0, 2.0), jr.DataType.BF16: (1.0, 2.0 ** -8, 1.0 + 2.0 ** -8)}


@pytest.mark.parametrize("path", TORCH_PATHS + ["torch-one-hot", TRITON])
@pytest.mark.parametrize("data_type", [jr.DataType.FP16, jr.DataType.BF16])
def test_half_tables_sum_in_fp32(path, data_type, monkeypatch):
    """The output is fp32 and so is every partial sum, on every path."""
    backend = _use_path("torch" if path == "torch-one-hot" else path, monkeypatch)
    first, second, weight = HALF_ROWS[data_type]
    configs = [jr.EmbeddingBagConfig(name=n, embedding_dim=3, num_embeddings=4, feature_names=[f], data_type=data_type)
               for n, f in (("t", "f"), ("u", "g"))]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, device=DEVICE)
    table = torch.tensor([[first] * 3, [second] * 3, [-1.0] * 3, [0.5] * 3])
    with torch.no_grad():
        for name in ("t", "u"):
            ebc.embedding_bags[name].weight.copy_(table)
    if path == "torch-one-hot":  # every bag one id: the row gather path
        ids, lengths, psw = [0, 1, 1, 0], [1, 1, 1, 1], [weight, 1.0, weight, weight]
    else:
        ids, lengths, psw = [0, 1, 1, 0, 1, 0, 2], [2, 1, 0, 4], [1.0, 1.0, weight, 1.0, 1.0, weight, 1.0]
    kjt = jr.KeyedJaggedTensor(["f", "g"], torch.tensor(ids), torch.tensor(psw), lengths=torch.tensor(lengths))
    out = ebc(kjt.to(torch.device(DEVICE))).values().cpu()
    stored = ebc.embedding_bags["t"].weight.detach().cpu()
    n = sum(lengths[:2])  # ids of "f", then of "g" (batch 2)
    expected = torch.cat([_pool64(stored, ids[:n], lengths[:2], psw[:n]),
                          _pool64(stored, ids[n:], lengths[2:], psw[n:])], 1)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), expected), (out, expected)


@pytest.mark.parametrize("data_type", [jr.DataType.FP16, jr.DataType.BF16])
def test_half_tables_sum_in_fp32_compiled(data_type):
    """Compiled and eager give the same fp32 sums (compiled once gave inf where eager gave 80000)."""
    torch._dynamo.reset()
    first, second, weight = HALF_ROWS[data_type]
    configs = [jr.EmbeddingBagConfig(name="t", embedding_dim=3, num_embeddings=4, feature_names=["f"],
                                     data_type=data_type)]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend="torch")
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(torch.tensor([[first] * 3, [second] * 3, [-1.0] * 3, [0.5] * 3]))
    stored = ebc.embedding_bags["t"].weight.detach()
    compiled = torch.compile(ebc, fullgraph=True)
    for ids, lengths, psw in (([0, 1], [1, 1], [weight, weight]), ([0, 1, 3], [2, 0, 1], [1.0, weight, 2.0])):
        kjt = jr.KeyedJaggedTensor(["f"], torch.tensor(ids), torch.tensor(psw), lengths=torch.tensor(lengths))
        expected = _pool64(stored, ids, lengths, psw)
        assert torch.equal(compiled(kjt).values().double(), expected), data_type
        assert torch.equal(ebc(kjt).values().double(), expected), data_type
    torch._dynamo.reset()


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("chunk_bytes", [1, 40, 1 << 20])
def test_half_tables_widened_a_chunk_of_bags_at_a_time(path, chunk_bytes, monkeypatch):
    """Eager CPU widens fp16 rows to fp32 a cache-sized chunk of whole bags at a time; chunks of
    one id, of a few bags, and one chunk for everything give the reference's sums."""
    _use_path(path, monkeypatch)
    monkeypatch.setattr(pooled_torch, "_WIDE_CHUNK_BYTES", chunk_bytes)
    for seed, weighted in ((8, True), (9, False)):
        check_module(seed, [3, 8, 17], weighted, data_type=jr.DataType.FP16, backend="torch", batch=7, max_len=6)
