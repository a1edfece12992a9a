"""The quantized collection's torch path over segments: neighbouring features of one storage
type and dim pooled by one call over their block of tables (ids shifted), or one call per
feature, and one-hot batches gathered batch-major.

References: each feature pooled on its own in float64, from its table's rows decoded by the
layout ``ops/quantized_rows.py`` documents (not by the package's decoder), so any id shift, key
range or column placement that goes wrong shows; and the float collection within the rounding
bound.
"""

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.ops import quantized_torch
from jr_testing import random_kjt, shuffled_keys
from test_quant import _bound

ROWS = {"a": 7, "b": 13, "c": 7, "d": 9, "e": 5, "f": 6}


def _configs():
    """Same-dim tables reading neighbouring keys (a segment of 4 features over 3 tables, two of
    them on one table), odd dims, MEAN beside SUM, and key ``a`` read again by a last table."""
    return [
        jr.EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=13, feature_names=["a", "b"]),
        jr.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=7, feature_names=["c"],
                              pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=9, feature_names=["d"]),
        jr.EmbeddingBagConfig(name="t3", embedding_dim=3, num_embeddings=5, feature_names=["e"]),
        jr.EmbeddingBagConfig(name="t4", embedding_dim=3, num_embeddings=6, feature_names=["f"],
                              pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="t5", embedding_dim=8, num_embeddings=7, feature_names=["a"]),
    ]


def _float_module(weighted):
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(_configs(), is_weighted=weighted)
    with torch.no_grad():  # rows of different ranges, so that each has its own scale
        for c in ebc.embedding_bag_configs():
            w = ebc.embedding_bags[c.name].weight
            w.mul_(torch.rand(w.shape[0], 1) * 4 + 0.1).add_(torch.randn(w.shape[0], 1))
    return ebc


def _decoded(rows, data_type, dim):
    """``[R, dim]`` float64 values of ``[R, stride]`` quantized rows, read off the layout that
    ``ops/quantized_rows.py`` documents: codes from the row's start, scale and bias in its last bytes."""
    rows, stride = rows.contiguous(), rows.shape[1]
    if data_type == DataType.FP16:
        return rows[:, :2 * dim].contiguous().view(torch.float16).double()
    if data_type == DataType.INT8:
        codes = rows[:, :dim].double()
        meta = rows[:, stride - 8:].contiguous().view(torch.float32).double()
    else:
        packed = rows[:, :(dim + 1) // 2].long()
        codes = torch.stack([packed % 16, packed // 16], dim=2).flatten(1)[:, :dim].double()
        meta = rows[:, stride - 4:].contiguous().view(torch.float16).double()
    return codes * meta[:, :1] + meta[:, 1:]


def _per_feature_reference(q, batch):
    """``[B, total_dim]`` float64: each feature pooled alone from its table's decoded rows."""
    columns = []
    for t, c in enumerate(q.embedding_bag_configs()):
        table = _decoded(q.table_rows(t), c.data_type, c.embedding_dim)
        for feature in c.feature_names:
            values, lengths, weights = batch.per_key[feature]
            offsets = F.pad(lengths.long().cumsum(0), (1, 0))
            pooled = F.embedding_bag(values.long(), table, offsets, mode="sum", include_last_offset=True,
                                     per_sample_weights=None if weights is None else weights.double())
            if c.pooling == jr.PoolingType.MEAN:
                pooled = pooled / lengths.clamp(min=1).double().unsqueeze(1)
            columns.append(pooled)
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("types", [
    {"*": DataType.INT8}, {"*": DataType.INT4}, {"*": DataType.FP16},
    {"*": DataType.INT4, "t1": DataType.INT8, "t4": DataType.FP16},  # a segment broken by another type
])
@pytest.mark.parametrize("path", ["block", "per_feature"])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_segments_match_each_feature_pooled_alone(monkeypatch, types, path, one_hot, weighted, id_dtype):
    # the cost model picks one call per block or per feature; force each
    monkeypatch.setattr(quantized_torch, "_CALL_NS", 10**12 if path == "block" else 0)
    bags_per_call = []
    pool = quantized_torch._bag_sums
    monkeypatch.setattr(quantized_torch, "_bag_sums", lambda rows, seg, ids, offsets, psw: (
        bags_per_call.append(offsets.shape[0] - 1), pool(rows, seg, ids, offsets, psw))[1])
    ebc = _float_module(weighted)
    per_table = {name: d for name, d in types.items() if name != "*"}
    q = quant.EmbeddingBagCollection.from_float(ebc, types["*"], per_table)
    gen = torch.Generator().manual_seed(1)
    for i, keys in enumerate((list(ROWS), shuffled_keys(gen, list(ROWS)), shuffled_keys(gen, list(ROWS)))):
        bags_per_call.clear()
        empty = () if one_hot else ("d",)
        batch = random_kjt(gen, keys, ROWS, 6, weighted=weighted, empty_keys=empty, id_dtype=id_dtype,
                           one_hot=one_hot)
        got = q(batch.kjt)
        assert got.keys() == ebc(batch.kjt).keys() and got.values().shape == (6, 46)
        torch.testing.assert_close(got.values().double(), _per_feature_reference(q, batch), rtol=1e-5, atol=1e-5)
        error = (got.values() - ebc(batch.kjt).values()).abs()
        assert (error <= _bound(q, ebc, batch) + 1e-6).all()
        if i == 0 and len(types) == 1:  # keys in order: a, b, c, d are one segment of 4 keys
            assert max(bags_per_call) == (24 if path == "block" or one_hot else 6), bags_per_call


@pytest.mark.parametrize("one_hot", [False, True])
def test_padded_rows_and_empty_batches(one_hot):
    """row_align 16 (rows dequantized here, not by torch's op), and batches of no ids or no samples."""
    ebc = _float_module(True)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT4, {"t2": DataType.INT8, "t3": DataType.FP16},
                                                row_align=16)
    gen = torch.Generator().manual_seed(2)
    batch = random_kjt(gen, list(ROWS), ROWS, 5, weighted=True, one_hot=one_hot)
    torch.testing.assert_close(q(batch.kjt).values().double(), _per_feature_reference(q, batch), rtol=1e-5,
                               atol=1e-5)
    keys = list(ROWS)
    no_ids = jr.KeyedJaggedTensor(keys, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                  lengths=torch.zeros(3 * len(keys), dtype=torch.int64))
    assert torch.equal(q(no_ids).values(), torch.zeros(3, 46))
    no_samples = jr.KeyedJaggedTensor(keys, torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                      lengths=torch.zeros(0, dtype=torch.int64))
    assert q(no_samples).values().shape == (0, 46)
