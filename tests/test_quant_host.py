"""The quantized collection's eager CPU forward (``jaggedrec/quant/host_path.py``): what it
reads and how many ops it dispatches, the same outputs bit for bit as the general path
(``read_batch`` and the op), and the same errors, word for word, as the float collection.

References: each feature pooled alone in float64 from its table's rows decoded off the layout
(``test_quant_segments``), the float collection's validation errors, and the general path's
outputs (the host path switched off).
"""

from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.ops import quantized_torch
from jaggedrec.ops.feature_tables import STORAGE_INT4, STORAGE_INT8
from jaggedrec.quant import host_path
from jr_testing import random_kjt, shuffled_keys
from test_quant_segments import ROWS, _float_module, _per_feature_reference

POOLING_OPS = {"quantized.embedding_bag_byte_rowwise_offsets", "quantized.embedding_bag_4bit_rowwise_offsets"}
# ops that take the ids but read none of them: views, and new tensors of their dtype
NO_READ = {"aten.slice", "aten.view", "aten.as_strided", "aten.alias", "aten.select", "aten.t", "aten.transpose",
           "aten._unsafe_view", "aten.detach", "aten.new_zeros", "aten.new_empty"}


class _Ops(TorchDispatchMode):
    """Every op dispatched inside, with the storages of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        storages = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                    if isinstance(a, torch.Tensor) and a.numel()}
        self.calls.append((str(func.overloadpacket), storages))
        return func(*args, **(kwargs or {}))


def _forward_ops(q, kjt) -> List[tuple]:
    q(kjt)  # the first call may probe torch's op once per process
    with torch.no_grad(), _Ops() as ops:
        q(kjt)
    return ops.calls


def _layouts(kjt: jr.KeyedJaggedTensor):
    """The batch as lengths, as offsets, and as both."""
    lengths = kjt.lengths()
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(lengths.dtype)
    values, weights, keys = kjt.values(), kjt.weights_or_none(), kjt.keys()
    return [jr.KeyedJaggedTensor(keys, values, weights, lengths=lengths),
            jr.KeyedJaggedTensor(keys, values, weights, offsets=offsets),
            jr.KeyedJaggedTensor(keys, values, weights, lengths=lengths, offsets=offsets)]


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_ids_are_read_only_by_the_pooling_ops(monkeypatch, data_type, weighted, id_dtype):
    """Calls over one table each: the range check is torch's op's own, so no other op reads the
    ids (on main an aminmax over every id ran first: at 20 ids per bag ~1/6 of the forward)."""
    monkeypatch.setattr(quantized_torch, "_CALL_NS", 0)  # one call per feature
    q = quant.EmbeddingBagCollection.from_float(_float_module(weighted), data_type)
    gen = torch.Generator().manual_seed(3)
    batch = random_kjt(gen, list(ROWS), ROWS, 8, weighted=weighted, id_dtype=id_dtype, empty_keys=("d",))
    for kjt in _layouts(batch.kjt):
        ids = kjt.values().untyped_storage().data_ptr()
        readers = [name for name, storages in _forward_ops(q, kjt) if ids in storages]
        assert set(readers) - NO_READ <= POOLING_OPS, readers


def test_op_count_does_not_grow_with_features_of_one_table_group():
    """Many same-dim features with few ids: one pooling call for the group, at most 3 values
    read back to the host (lengths.min() and the block's aminmax; main read 5 or 6), and the
    same ops per forward for 20 features as for 40."""
    counts = {}
    for features in (20, 40):
        configs = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=50 + i,
                                         feature_names=[f"f{i}"]) for i in range(features)]
        q = quant.EmbeddingBagCollection.from_float(jr.EmbeddingBagCollection(configs), DataType.INT8)
        gen = torch.Generator().manual_seed(4)
        lengths = torch.randint(0, 4, (features * 16,), generator=gen)
        values = torch.randint(0, 50, (int(lengths.sum()),), generator=gen)
        counts[features] = []
        for kjt in _layouts(jr.KeyedJaggedTensor([f"f{i}" for i in range(features)], values, lengths=lengths)):
            calls = [name for name, _ in _forward_ops(q, kjt)]
            assert sum(name in POOLING_OPS for name in calls) == 1, calls
            assert sum(name == "aten._local_scalar_dense" for name in calls) <= 3, calls
            counts[features].append(calls)
    assert counts[20] == counts[40]


def test_op_refuses_bad_ids_on_this_torch():
    """The probe that lets the range check ride on torch's op: true for FBGEMM's kernels."""
    assert quantized_torch.op_refuses_bad_ids(STORAGE_INT8) and quantized_torch.op_refuses_bad_ids(STORAGE_INT4)


def _general_path(monkeypatch, q, kjt):
    with monkeypatch.context() as m:
        m.setattr(host_path, "serves", lambda *args: False)
        return q(kjt).values()


@pytest.mark.parametrize("types", [{"*": DataType.INT8}, {"*": DataType.INT4},
                                   {"*": DataType.INT4, "t1": DataType.INT8, "t4": DataType.FP16}])
@pytest.mark.parametrize("path", ["block", "per_feature"])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_same_bits_as_the_general_path_and_the_reference(monkeypatch, types, path, one_hot, weighted, id_dtype):
    monkeypatch.setattr(quantized_torch, "_CALL_NS", 10**12 if path == "block" else 0)
    per_table = {name: d for name, d in types.items() if name != "*"}
    q = quant.EmbeddingBagCollection.from_float(_float_module(weighted), types["*"], per_table)
    gen = torch.Generator().manual_seed(5)
    for keys in (list(ROWS), shuffled_keys(gen, list(ROWS))):
        batch = random_kjt(gen, keys, ROWS, 7, weighted=weighted, id_dtype=id_dtype,
                           empty_keys=() if one_hot else ("d", "e"), one_hot=one_hot)
        expected = _per_feature_reference(q, batch)
        for kjt in _layouts(batch.kjt):
            got = q(kjt).values()
            assert torch.equal(got, _general_path(monkeypatch, q, kjt))
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_mixed_index_dtypes_pool_alike():
    """int32 ids with int64 lengths, and int64 ids with int32 lengths: the same output as one dtype."""
    q = quant.EmbeddingBagCollection.from_float(_float_module(True), DataType.INT8)
    batch = random_kjt(torch.Generator().manual_seed(6), list(ROWS), ROWS, 5, weighted=True)
    kjt = batch.kjt
    expected = q(kjt).values()
    for ids, lengths in ((torch.int32, torch.int64), (torch.int64, torch.int32)):
        mixed = jr.KeyedJaggedTensor(kjt.keys(), kjt.values().to(ids), kjt.weights(), lengths=kjt.lengths().to(lengths))
        assert torch.equal(q(mixed).values(), expected)


def _bad_batches(id_dtype):
    """(name, KJT) pairs of batches validation refuses, on keys a..f with 3 samples each."""
    keys = list(ROWS)
    lengths = torch.tensor([1, 0, 2] * len(keys), dtype=id_dtype)
    good = torch.cat([torch.tensor([0, 1, 2]) for _ in keys]).to(id_dtype)

    def kjt(values, **kw):
        return jr.KeyedJaggedTensor(keys, values.to(id_dtype), **kw)

    bad_id = good.clone()
    bad_id[3 * keys.index("b") + 2] = ROWS["b"]  # past its table: 13
    negative = good.clone()
    negative[3 * keys.index("e")] = -1
    big_in_small = good.clone()
    big_in_small[3 * keys.index("e") + 1] = ROWS["e"]  # 5: inside the block of dim-3 tables, past its own
    short = lengths.clone()
    short[4] = -1
    short[5] = 3
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
    disagree = offsets.clone()
    disagree[2] += 1
    return [("id past its table", kjt(bad_id, lengths=lengths)),
            ("negative id", kjt(negative, lengths=lengths)),
            ("id past its own table in a block", kjt(big_in_small, lengths=lengths)),
            ("negative length", kjt(good, lengths=short)),
            ("too few ids", kjt(good[:-1], lengths=lengths)),
            ("offsets from 1", kjt(good, offsets=offsets + 1)),
            ("offsets past the ids", kjt(good, offsets=torch.cat([offsets[:-1], offsets[-1:] + 1]))),
            ("lengths and offsets disagree", kjt(good, lengths=lengths, offsets=disagree))]


@pytest.mark.parametrize("path", ["block", "per_feature"])
@pytest.mark.parametrize("op_checks", [True, False])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_bad_batches_get_the_float_collections_errors(monkeypatch, path, op_checks, id_dtype):
    monkeypatch.setattr(quantized_torch, "_CALL_NS", 10**12 if path == "block" else 0)
    if not op_checks:  # a torch whose op does not check: the explicit check words the same errors
        monkeypatch.setattr(quantized_torch, "op_refuses_bad_ids", lambda storage: False)
    ebc = _float_module(False)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT4, {"t1": DataType.INT8})
    for name, kjt in _bad_batches(id_dtype):
        with pytest.raises(ValueError) as expected:
            ebc(kjt)
        with pytest.raises(ValueError) as got:
            q(kjt)
        assert str(got.value) == str(expected.value), name
        assert got.value.__context__ is None, name  # not chained to the op's own error
