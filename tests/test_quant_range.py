"""jaggedrec.quant on tables past a storage type's range, and row_align against the types.

Random tables with a few huge rows: by default quantizing refuses them, naming the table and
the first such row; with ``on_overflow="clamp"`` those rows are clamped and one warning names
the tables and counts, and every output value must then lie within an independent float64
bound (half the step of the clamped row's range, plus the fp16 rounding of INT4's scale and
bias) of the clamped float table.
"""

import warnings

import pytest
import torch

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.quant.rowwise import dequantize_rows, error_bound, quantize_rows

ROWS, DIM = 40, 12
HUGE = [5, 17, 30]  # rows past the type's range
# fp16's largest value; for INT8 a range of 2**127, whose fp32 scale and dequantized values stay finite
LIMIT = {DataType.FP16: 65504.0, DataType.INT4: 65504.0, DataType.INT8: 2.0 ** 126}
TORCH_DTYPE = {DataType.FP16: torch.half, DataType.INT4: torch.quint4x2, DataType.INT8: torch.qint8}


def _huge_table(data_type, seed=0):
    """``[ROWS, DIM]`` fp32: N(0, s) rows, rows ``HUGE`` past ``data_type``'s range, and row 8
    large but within it (it must be neither refused nor clamped)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, DIM, generator=gen) * (torch.rand(ROWS, 1, generator=gen) * 3 + 0.1)
    if data_type == DataType.FP16:
        w[5, 3] = 1e5
        w[17] = torch.randn(DIM, generator=gen) * 1e6
        w[30, 0] = -float("inf")
        w[8, 2] = 65510.0  # rounds to 65504
    elif data_type == DataType.INT4:
        w[5, 3] = -1e5  # its bias would be -inf in fp16
        w[17] = torch.rand(DIM, generator=gen) * 2e6  # its scale, ~2e6/15, past fp16
        w[30, 0] = float("inf")
        w[8, 2] = 7e4  # above 65504, but scale 7e4/15 and bias ~-1 fit fp16
    else:
        w[5, 3], w[5, 4] = 3e38, -3e38  # a span past fp32
        w[17] = torch.randn(DIM, generator=gen) * 2e38
        w[17, 0], w[17, 1] = -2e38, 2e38
        w[30, 0] = float("inf")
        w[8] = -torch.rand(DIM, generator=gen) * 3e38  # spans ~3e38: finite scale, and |bias| + span past fp32
        w[8, 0], w[8, 1] = -3e38, 0.0
    return w


def _collection(data_type):
    """t0 ordinary, t1 with huge rows; features a -> t0, b -> t1 (MEAN)."""
    ebc = jr.EmbeddingBagCollection([
        jr.EmbeddingBagConfig(name="t0", embedding_dim=6, num_embeddings=ROWS, feature_names=["a"]),
        jr.EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["b"],
                              pooling=jr.PoolingType.MEAN)])
    with torch.no_grad():
        ebc.embedding_bags["t1"].weight.copy_(_huge_table(data_type))
    return ebc


def _clamped(w, data_type):
    """float64 ``w`` with rows ``HUGE`` clamped into the type's range."""
    out = w.double().clone()
    out[HUGE] = out[HUGE].clamp(-LIMIT[data_type], LIMIT[data_type])
    return out


def _bound64(w, data_type):
    """``[R, D]`` float64: the most a rowwise-quantized element of float64 rows ``w`` may err.

    INT8: half the step ``(max - min)/255``; INT4 the same with 15 levels, the step widened by
    its fp16 rounding up (2**-10 relative) and the bias rounded down (one fp16 ulp of the
    minimum); FP16: half an fp16 ulp of the element. Plus fp32's rounding of ``q*scale + bias``."""
    low, high = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    fp32 = (low.abs() + high.abs()) * 2.0 ** -21
    if data_type == DataType.FP16:
        return w.abs() * 2.0 ** -11 + 2.0 ** -25
    if data_type == DataType.INT8:
        return ((high - low) / 255 / 2 + fp32 + 1e-8).expand_as(w)
    return ((high - low) / 15 / 2 * (1 + 2.0 ** -9) + low.abs() * 2.0 ** -10 + fp32 + 2.0 ** -24).expand_as(w)


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4, DataType.FP16])
def test_rows_past_the_range_are_refused_naming_table_and_row(data_type):
    ebc = _collection(data_type)
    with pytest.raises(ValueError, match=r"table 't1': row 5 .*on_overflow='clamp'"):
        quant.EmbeddingBagCollection.from_float(ebc, data_type)
    with pytest.raises(ValueError, match=r"table 't1': row 5 "):
        quant.quantize_embeddings(torch.nn.Sequential(ebc), dtype=TORCH_DTYPE[data_type], inplace=False)
    with pytest.raises(ValueError, match=r"row 5 "):
        quantize_rows(_huge_table(data_type), data_type)
    ok = _huge_table(data_type)[[i for i in range(ROWS) if i not in HUGE]]  # row 8 included: within range
    rows = quantize_rows(ok, data_type)
    assert torch.isfinite(dequantize_rows(rows, data_type, DIM)).all()
    assert torch.isfinite(error_bound(rows, data_type, DIM)).all()
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        quant.EmbeddingBagCollection.from_float(ebc, data_type, on_overflow="ignore")


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4, DataType.FP16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_clamp_warns_once_and_stays_within_the_bound_of_the_clamped_table(data_type, id_dtype):
    ebc = _collection(data_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quant.EmbeddingBagCollection.from_float(ebc, data_type, on_overflow="clamp")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert f"3 of {ROWS} rows of table 't1'" in messages[0] and "'t0'" not in messages[0]
    # every row once, one id per bag: each output row is a dequantized table row
    ids = torch.arange(ROWS, dtype=id_dtype)
    kjt = jr.KeyedJaggedTensor(["b", "a"], torch.cat([ids, ids]), lengths=torch.ones(2 * ROWS, dtype=id_dtype))
    out = q(kjt).to_dict()
    for name, feature in (("t0", "a"), ("t1", "b")):
        want = ebc.embedding_bags[name].weight.detach().double()
        if name == "t1":
            want = _clamped(want, data_type)
        got = out[feature].double()
        assert torch.isfinite(got).all(), name
        error = (got - want).abs()
        assert (error <= _bound64(want, data_type)).all(), (name, (error - _bound64(want, data_type)).max())
        t = [c.name for c in q.embedding_bag_configs()].index(name)
        package_bound = error_bound(q.table_rows(t), data_type, want.shape[1]).double()
        assert torch.isfinite(package_bound).all()
        assert (error <= package_bound.unsqueeze(1)).all(), name
    if data_type != DataType.INT8:  # fp16's largest value is exact: the clamped values come back as they are
        assert out["b"][17].abs().max() == LIMIT[data_type]
    with pytest.warns(UserWarning, match="rows of table 't1'"):
        swapped = quant.quantize_embeddings(torch.nn.Sequential(ebc), dtype=TORCH_DTYPE[data_type], inplace=False,
                                            on_overflow="clamp")
    assert torch.equal(swapped[0].table_rows(1), q.table_rows(1))


@pytest.mark.parametrize("on_overflow", ["raise", "clamp"])
def test_nan_is_refused_either_way(on_overflow):
    ebc = _collection(DataType.INT8)
    with torch.no_grad():
        ebc.embedding_bags["t0"].weight[11, 2] = float("nan")
    with pytest.raises(ValueError, match=r"table 't0': row 11 holds NaN"):
        quant.EmbeddingBagCollection.from_float(ebc, DataType.FP16, on_overflow=on_overflow)


def _configs(data_type, dims):
    return [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=9, feature_names=[f"f{i}"],
                                  data_type=data_type) for i, d in enumerate(dims)]


def test_row_align_is_checked_against_each_tables_type_when_built():
    with pytest.raises(ValueError, match=r"table 't1' \(FP16, dim 1\): row_align=3 gives rows of 3 bytes"):
        quant.EmbeddingBagCollection(_configs(DataType.FP16, (3, 1)), row_align=3)
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=9,
                                                           feature_names=["f"])])
    with pytest.raises(ValueError, match=r"table 't' \(FP16, dim 2\): row_align=7 gives rows of 7 bytes"):
        quant.EmbeddingBagCollection.from_float(ebc, DataType.FP16, row_align=7)
    for bad, error in ((0, ValueError), (-16, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="row_align"):
            quant.EmbeddingBagCollection(_configs(DataType.INT8, (4,)), row_align=bad)


@pytest.mark.parametrize("data_type,dims", [(DataType.INT8, (4, 1, 7)), (DataType.INT4, (3, 8)),
                                            (DataType.FP16, (3, 6))])
def test_odd_row_aligns_the_types_allow_pool_correctly(data_type, dims):
    """INT8 and INT4 rows take any stride; FP16 dims whose rows come out even at row_align 3."""
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=9,
                                                           feature_names=[f"f{i}"]) for i, d in enumerate(dims)])
    q = quant.EmbeddingBagCollection.from_float(ebc, data_type, row_align=3)
    keys = [f"f{i}" for i in range(len(dims))]
    ids = torch.arange(9)
    out = q(jr.KeyedJaggedTensor(keys, ids.repeat(len(dims)), lengths=torch.ones(9 * len(dims),
                                                                                   dtype=torch.int64))).to_dict()
    for i, d in enumerate(dims):
        want = ebc.embedding_bags[f"t{i}"].weight.detach().double()
        assert ((out[f"f{i}"].double() - want).abs() <= _bound64(want, data_type)).all(), i
