"""jaggedrec.quant against the float collection it was built from.

The float module's output (itself checked against ``nn.EmbeddingBag`` elsewhere) is the
reference; each pooled element must lie within the quantization's bound: the sum over the
bag's ids of |weight| times the row's largest element error (half a quantization step; for
FP16 half an ulp), divided by the length under MEAN. The steps themselves are checked against
the float rows' min and max, independently of the module.
"""

import io
import subprocess
import sys

import pytest
import torch

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.quant.rowwise import dequantize_rows, error_bound, quantize_rows, scale_bias
from jr_testing import random_kjt, shuffled_keys

QUANT = [DataType.INT8, DataType.INT4, DataType.FP16]


def _configs(dims=(8, 3, 130, 1)):
    return [
        jr.EmbeddingBagConfig(name="t0", embedding_dim=dims[0], num_embeddings=13, feature_names=["a"]),
        jr.EmbeddingBagConfig(name="t1", embedding_dim=dims[1], num_embeddings=7, feature_names=["b", "a"],
                              pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="t2", embedding_dim=dims[2], num_embeddings=9, feature_names=["c"]),
        jr.EmbeddingBagConfig(name="t3", embedding_dim=dims[3], num_embeddings=5, feature_names=["d"]),
    ]


ROWS = {"a": 7, "b": 7, "c": 9, "d": 5}


def _float_module(weighted, seed=0):
    torch.manual_seed(seed)
    ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=weighted)
    with torch.no_grad():  # spread the rows' ranges, so that scales differ from row to row
        for c in ebc.embedding_bag_configs():
            w = ebc.embedding_bags[c.name].weight
            w.mul_(torch.rand(w.shape[0], 1) * 4 + 0.1).add_(torch.randn(w.shape[0], 1))
    return ebc


def _bound(q, ebc, batch):
    """``[B, total_dim]`` the largest error each pooled element may have."""
    columns = []
    for t, c in enumerate(q.embedding_bag_configs()):
        per_row = error_bound(q.table_rows(t), c.data_type, c.embedding_dim)
        for feature in c.feature_names:
            values, lengths, weights = batch.per_key[feature]
            w = torch.ones(values.shape[0]) if weights is None else weights.abs()
            bags = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
            bound = torch.zeros(lengths.shape[0]).index_add_(0, bags, w * per_row[values.long()])
            if c.pooling == jr.PoolingType.MEAN:
                bound = bound / lengths.clamp(min=1)
            columns.append(bound.unsqueeze(1).expand(-1, c.embedding_dim))
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("data_type", QUANT)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("row_align", [1, 16])
def test_pooled_within_the_rounding_bound(data_type, weighted, id_dtype, row_align):
    ebc = _float_module(weighted)
    q = quant.EmbeddingBagCollection.from_float(ebc, data_type, row_align=row_align)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = random_kjt(gen, shuffled_keys(gen, list(ROWS)), ROWS, 5, weighted=weighted, empty_keys=("d",),
                           id_dtype=id_dtype)
        got, want = q(batch.kjt), ebc(batch.kjt)
        assert got.keys() == want.keys() and got.values().dtype == torch.float32
        error = (got.values() - want.values()).abs()
        bound = _bound(q, ebc, batch)
        assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4])
def test_steps_follow_each_rows_range(data_type):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(50, 11, generator=gen) * torch.rand(50, 1, generator=gen) * 10
    w[3] = 0.25  # a constant row
    rows = quantize_rows(w, data_type)
    scale, bias = scale_bias(rows, data_type, 11)
    levels = 255 if data_type == DataType.INT8 else 15
    low, high = w.min(1).values, w.max(1).values
    expected = (high - low) / levels
    if data_type == DataType.INT8:
        assert torch.equal(scale, expected) and torch.equal(bias, low)
    else:  # fp16: scale rounded up, bias down, each by at most one ulp
        assert (bias <= low).all() and (low - bias <= low.abs() * 2 ** -10 + 2 ** -24).all()
        nonconstant = high > low
        assert (scale[nonconstant] >= expected[nonconstant]).all()
        assert (scale[nonconstant] <= expected[nonconstant] * (1 + 2 ** -9) + 2 ** -23).all()
    error = (dequantize_rows(rows, data_type, 11) - w).abs()
    assert (error <= error_bound(rows, data_type, 11).unsqueeze(1)).all()
    assert error[3].max() <= 2 ** -20  # a constant row comes back exactly (up to fp32 rounding)


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4])
def test_bound_holds_for_narrow_rows(data_type):
    """Rows as narrow as the benchmarks' (uniform in +-sqrt(1/100k)), where INT8's code rounding
    by 255/(max-min+1e-8) instead of 1/scale shifts a code by a visible part of a step."""
    gen = torch.Generator().manual_seed(3)
    w = (torch.rand(4000, 64, generator=gen) * 2 - 1) * 100_000 ** -0.5
    rows = quantize_rows(w, data_type)
    error = (dequantize_rows(rows, data_type, 64) - w).abs()
    assert (error <= error_bound(rows, data_type, 64).unsqueeze(1)).all()


def test_int8_rows_are_torchs_byte_prepack_rows():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 24, generator=gen) * 3
    assert torch.equal(quantize_rows(w, DataType.INT8), torch.ops.quantized.embedding_bag_byte_prepack(w))


def test_mixed_precision_and_memory():
    ebc = _float_module(False)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT4, {"t1": DataType.FP16, "t3": DataType.INT8})
    types = {c.name: c.data_type for c in q.embedding_bag_configs()}
    assert types == {"t0": DataType.INT4, "t1": DataType.FP16, "t2": DataType.INT4, "t3": DataType.INT8}
    float_bytes = sum(p.numel() * p.element_size() for p in ebc.parameters())
    quant_bytes = sum(b.numel() for b in q.buffers())
    assert quant_bytes < float_bytes / 3
    with pytest.raises(ValueError, match="does not have"):
        quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8, {"nope": DataType.INT4})


def test_state_dict_round_trips_exactly():
    ebc = _float_module(True)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT4, {"t2": DataType.INT8})
    state = q.state_dict()
    assert sorted(state) == [f"embedding_bags.t{i}.weight" for i in range(4)]
    assert state["embedding_bags.t2.weight"].dtype == torch.uint8
    fresh = quant.EmbeddingBagCollection(q.embedding_bag_configs(), is_weighted=True)
    fresh.load_state_dict(state)
    for name in ("qweights_int8", "qweights_int4", "qweights_fp16"):
        assert torch.equal(getattr(fresh, name), getattr(q, name))
    batch = random_kjt(torch.Generator().manual_seed(5), list(ROWS), ROWS, 4, weighted=True)
    assert torch.equal(fresh(batch.kjt).values(), q(batch.kjt).values())
    with pytest.raises(RuntimeError, match="size mismatch"):
        quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8).load_state_dict(state)


def test_quantize_embeddings_swaps_every_collection():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sparse = torch.nn.ModuleDict({"ebc": _float_module(False)})
            self.dense = torch.nn.Linear(4, 1)

    model = Model()
    copy = quant.quantize_embeddings(model, dtype=torch.quint4x2, inplace=False,
                                     per_table_weight_dtype={"t3": torch.half})
    assert isinstance(model.sparse["ebc"], jr.EmbeddingBagCollection)
    swapped = copy.sparse["ebc"]
    assert isinstance(swapped, quant.EmbeddingBagCollection) and copy.dense is not model.dense
    assert [c.data_type for c in swapped.embedding_bag_configs()] == [DataType.INT4] * 3 + [DataType.FP16]
    quant.quantize_embeddings(model, dtype=torch.qint8)
    assert isinstance(model.sparse["ebc"], quant.EmbeddingBagCollection)
    with pytest.raises(ValueError, match="dtype"):
        quant.quantize_embeddings(Model(), dtype=torch.float64)


def test_bad_inputs():
    q = quant.EmbeddingBagCollection.from_float(_float_module(False), DataType.INT8)
    bad = jr.KeyedJaggedTensor(["a", "b", "c", "d"], torch.tensor([1, 7, 2, 3]), lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="'b'"):
        q(bad)
    with pytest.raises(ValueError, match="quantized, for inference"):
        jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3,
                                                         data_type=DataType.INT8)])
    with pytest.raises(ValueError, match="INT8, INT4 or FP16"):
        quant.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3)])


def test_vbe_batch_is_expanded():
    ebc = _float_module(False)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8)
    keys = ["a", "b", "c", "d"]
    kjt = jr.KeyedJaggedTensor(keys, torch.tensor([1, 2, 3, 4, 5, 0]), lengths=torch.tensor([2, 1, 1, 1, 0, 1]),
                               stride_per_key_per_rank=[[1], [2], [2], [1]],
                               inverse_indices=(keys, torch.tensor([[0, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]])))
    # sample b reads bag inverse[k][b] of key k: a [1, 2] thrice; b [3], [4], [4]; c [], [5], []; d [0] thrice
    expanded = jr.KeyedJaggedTensor(keys, torch.tensor([1, 2, 1, 2, 1, 2, 3, 4, 4, 5, 0, 0, 0]),
                                    lengths=torch.tensor([2, 2, 2, 1, 1, 1, 0, 1, 0, 1, 1, 1]))
    assert torch.equal(q(kjt).values(), q(expanded).values())


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    q = quant.EmbeddingBagCollection.from_float(_float_module(True), DataType.INT4, {"t0": DataType.INT8})
    compiled = torch.compile(q, fullgraph=True)
    gen = torch.Generator().manual_seed(6)
    for size in (3, 5, 6):
        batch = random_kjt(gen, list(ROWS), ROWS, size, weighted=True)
        torch.testing.assert_close(compiled(batch.kjt).values(), q(batch.kjt).values(), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


SERVE = """
import io, sys, torch
import jaggedrec  # registers jaggedrec's ops, which the program calls
program = torch.export.load(io.BytesIO(sys.stdin.buffer.read()))
values, lengths, weights, expected = torch.load(sys.argv[1])
kjt = jaggedrec.KeyedJaggedTensor(["a", "b", "c", "d"], values, weights, lengths=lengths)
out = program.module()(kjt)
assert torch.equal(out.values(), expected), (out.values() - expected).abs().max()
print("served")
"""


def test_export_loads_and_serves_in_a_fresh_process(tmp_path):
    from torch.export import Dim
    q = quant.EmbeddingBagCollection.from_float(_float_module(True), DataType.INT4, {"t2": DataType.INT8})
    gen = torch.Generator().manual_seed(7)
    example = random_kjt(gen, list(ROWS), ROWS, 4, weighted=True).kjt
    dynamic = {"features": [{0: Dim.AUTO}, {0: Dim.AUTO}, {0: Dim.AUTO}, None]}
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(q, (example,), dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    batch = random_kjt(gen, list(ROWS), ROWS, 6, weighted=True).kjt  # another batch size
    expected = q(batch).values()
    inputs = tmp_path / "batch.pt"
    torch.save((batch.values(), batch.lengths(), batch.weights(), expected), inputs)
    run = subprocess.run([sys.executable, "-c", SERVE, str(inputs)], input=buffer.getvalue(), capture_output=True,
                         timeout=300)
    assert run.returncode == 0 and b"served" in run.stdout, run.stderr.decode()[-3000:]


@pytest.mark.interpret
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_kernel_matches_the_torch_path(weighted):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ebc = _float_module(weighted)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT4, {"t0": DataType.INT8, "t3": DataType.FP16},
                                                row_align=16)
    kernels = quant.EmbeddingBagCollection(q.embedding_bag_configs(), is_weighted=weighted, device=device,
                                           row_align=16, backend="triton")
    kernels.load_state_dict(q.state_dict())
    gen = torch.Generator().manual_seed(8)
    batch = random_kjt(gen, shuffled_keys(gen, list(ROWS)), ROWS, 3, weighted=weighted, empty_keys=("d",))
    kjt = batch.kjt.to(device)
    torch.testing.assert_close(kernels(kjt).values().cpu(), q(batch.kjt).values(), rtol=1e-5, atol=1e-5)
    assert (kernels(kjt).values().cpu() - ebc(batch.kjt).values()).abs().le(_bound(q, ebc, batch) + 1e-5).all()


@pytest.mark.interpret
def test_triton_kernel_refuses_unaligned_rows_and_names_bad_ids():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ebc = _float_module(False)
    packed = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8, row_align=1, backend="triton")
    kjt = random_kjt(torch.Generator().manual_seed(9), list(ROWS), ROWS, 2).kjt.to(device)
    with pytest.raises(ValueError, match="row_align=16"):
        packed.to(device)(kjt)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8, row_align=16, backend="triton", validate=False)
    bad = jr.KeyedJaggedTensor(["a", "b", "c", "d"], torch.tensor([1, 7, 2, 3]), lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="'b'"):
        q.to(device)(bad.to(device))


@pytest.mark.parametrize("data_type,torch_dtype", [(DataType.INT8, torch.qint8), (DataType.INT4, torch.quint4x2)])
def test_agrees_with_torchrecs_quantized_module_when_installed(data_type, torch_dtype):
    """TorchRec's quantized collection (FBGEMM's IntNBit rows: fp16 scale and bias before the
    codes) quantizes the same float rows a little differently (about 3% of INT8 codes differ,
    from its fp16 scale); both stay within the bound, so they agree within twice it."""
    torchrec = pytest.importorskip("torchrec")
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as TorchRecQuant
    configs = [torchrec.EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=60, feature_names=[f"f{i}"])
               for i, dim in enumerate((16, 64))]
    torch.manual_seed(10)
    float_theirs = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    float_theirs.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch_dtype))
    theirs = TorchRecQuant.from_float(float_theirs)
    float_ours = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim,
                                                                  num_embeddings=60, feature_names=c.feature_names)
                                            for c in configs])
    float_ours.load_state_dict(float_theirs.state_dict())
    ours = quant.EmbeddingBagCollection.from_float(float_ours, data_type)
    gen = torch.Generator().manual_seed(11)
    batch = random_kjt(gen, ["f1", "f0"], {"f0": 60, "f1": 60}, 8, max_len=6)
    kjt = batch.kjt
    mine = ours(kjt)
    expected = theirs(torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths()))
    assert mine.keys() == expected.keys()
    bound = _bound(ours, float_ours, batch)
    assert ((mine.values() - expected.values()).abs() <= 2 * bound + 1e-6).all()


def _spec_bound(q, batch_spec, weighted):
    """``[B, total_dim]`` the bound of :func:`_bound`, from a hypothesis ``BatchSpec``."""
    columns = []
    for t, c in enumerate(q.embedding_bag_configs()):
        per_row = error_bound(q.table_rows(t), c.data_type, c.embedding_dim).double()
        for feature in c.feature_names:
            bound = torch.zeros(batch_spec.batch, dtype=torch.float64)
            for b, bag in enumerate(batch_spec.bags[feature]):
                w = batch_spec.weights[feature][b] if weighted else [1.0] * len(bag)
                bound[b] = sum(abs(x) * per_row[i] for i, x in zip(bag, w))
                if c.pooling == jr.PoolingType.MEAN:
                    bound[b] /= max(1, len(bag))
            columns.append(bound.unsqueeze(1).expand(-1, c.embedding_dim))
    return torch.cat(columns, dim=1)


def test_property_any_collection_and_batch_within_the_bound():
    from hypothesis import given, settings, strategies as st
    from property_strategies import batches, collections
    from test_properties import SETTINGS

    @settings(max_examples=120, **SETTINGS)
    @given(data=st.data())
    def check(data):
        coll = data.draw(collections(data_types=(DataType.FP32,), max_rows=300))
        batch = data.draw(batches(coll, layouts=("contiguous",)))
        types = data.draw(st.lists(st.sampled_from(QUANT), min_size=len(coll.tables), max_size=len(coll.tables)))
        torch.manual_seed(coll.seed)
        ebc = jr.EmbeddingBagCollection(coll.configs(), is_weighted=coll.weighted)
        q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8,
                                                    {t.name: d for t, d in zip(coll.tables, types)})
        kjt = batch.kjt()
        error = (q(kjt).values().double() - ebc(kjt).values().double()).abs()
        assert (error <= _spec_bound(q, batch, coll.weighted) * (1 + 1e-6) + 1e-7).all()

    check()
