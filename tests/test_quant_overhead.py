"""The quantized collection's eager CPU forward with fewer ops per call
(``jaggedrec/quant/host_path.py``, ``ops/quantized_torch.py``): keys pooled straight from the
KJT's own offsets where torch's op takes them, and the shape checks in one expression.

References: torch's own quantized op on offsets re-based to 0 (what a per-table loop hands it),
each feature pooled alone in float64 (``test_quant_segments``), and the float collection's
errors word for word.
"""

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.ops import quantized_torch
from jaggedrec.ops.feature_tables import STORAGE_INT4, STORAGE_INT8
from jr_testing import random_kjt
from test_quant_host import _forward_ops, _general_path
from test_quant_segments import ROWS, _float_module, _per_feature_reference

_PACK = {STORAGE_INT8: torch.ops.quantized.embedding_bag_byte_prepack,
         STORAGE_INT4: torch.ops.quantized.embedding_bag_4bit_prepack}
_OP = {STORAGE_INT8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
       STORAGE_INT4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets}


@pytest.mark.parametrize("storage", [STORAGE_INT8, STORAGE_INT4])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_unbased_offsets_probe_holds_on_a_real_batch(storage, id_dtype, weighted, threads):
    """Where the probe says torch's op takes a key's own offsets, it gives the bits of the call on
    offsets re-based to 0 for every key of a 3-key batch (empty bags, one bag split across the
    threads' chunks), and refuses a bad id of the key; where it says no, the op does not."""
    gen = torch.Generator().manual_seed(11)
    rows = _PACK[storage](torch.randn(40, 16, generator=gen))
    op, batch = _OP[storage], 67
    lengths = torch.randint(0, 6, (3 * batch,), generator=gen)
    lengths[::7] = 0
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
    values = torch.randint(0, 40, (int(offsets[-1]),), generator=gen, dtype=torch.int64).to(id_dtype)
    psw = torch.rand(values.shape[0], generator=gen) if weighted else None
    takes = quantized_torch.op_takes_unbased_offsets(storage)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        same = []
        for k in range(1, 3):
            lo, hi = int(offsets[k * batch]), int(offsets[(k + 1) * batch])
            own = offsets[k * batch:(k + 1) * batch + 1]
            expected = op(rows, values[lo:hi], own - lo, False, 0, False, None if psw is None else psw[lo:hi],
                          None, True)
            try:
                got = op(rows, values[:hi], own, False, 0, False, None if psw is None else psw[:hi], None, True)
            except RuntimeError:
                same.append(False)
                continue
            same.append(torch.equal(got, expected))
            if takes:
                bad = values.clone()
                bad[hi - 1] = 40
                with pytest.raises(RuntimeError):
                    op(rows, bad[:hi], own, False, 0, False, None if psw is None else psw[:hi], None, True)
    finally:
        torch.set_num_threads(previous)
    assert all(same) == takes, same
    if storage == STORAGE_INT8:
        assert takes  # FBGEMM's 8-bit kernel on every torch this package supports


def _int8_module(features, dim=16):
    configs = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=30 + i,
                                     feature_names=[f"f{i}"]) for i in range(features)]
    torch.manual_seed(2)
    return quant.EmbeddingBagCollection.from_float(jr.EmbeddingBagCollection(configs), DataType.INT8)


@pytest.mark.parametrize("features", [2, 5])
def test_int8_keys_pool_from_the_kjts_own_offsets(monkeypatch, features):
    """Per-feature INT8 calls take the KJT's offsets as they are: no op re-bases them (main
    subtracted each key's first offset, one op for all keys), and the output is the float64
    reference's; with the probe saying no, the same output through re-based offsets."""
    monkeypatch.setattr(quantized_torch, "_CALL_NS", 0)  # one call per feature
    q = _int8_module(features)
    rows = {f"f{i}": 30 + i for i in range(features)}
    batch = random_kjt(torch.Generator().manual_seed(12), list(rows), rows, 9)
    kjt = jr.KeyedJaggedTensor(batch.kjt.keys(), batch.kjt.values(), lengths=batch.kjt.lengths())
    calls = [name for name, _ in _forward_ops(q, kjt)]
    assert "aten.sub" not in calls, calls
    got = q(kjt).values()
    torch.testing.assert_close(got.double(), _per_feature_reference(q, batch), rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as m:
        m.setattr(quantized_torch, "op_takes_unbased_offsets", lambda storage: False)
        assert torch.equal(q(kjt).values(), got)
        assert "aten.sub" in [name for name, _ in _forward_ops(q, kjt)]


@pytest.mark.parametrize("types", [{"*": DataType.INT8}, {"*": DataType.INT8, "t2": DataType.INT4},
                                   {"*": DataType.INT4, "t1": DataType.INT8, "t4": DataType.FP16}])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_in_place_and_rebased_keys_mix(monkeypatch, types, weighted, id_dtype):
    """Mixed paths in one forward: the first key in place on any type, INT8 keys in place, INT4
    and FP16 keys re-based one at a time (one such key) or through the [K, B+1] relative offsets
    (more than two); the float64 reference's output, and the general path's bits."""
    monkeypatch.setattr(quantized_torch, "_CALL_NS", 0)
    per_table = {name: d for name, d in types.items() if name != "*"}
    q = quant.EmbeddingBagCollection.from_float(_float_module(weighted), types["*"], per_table)
    gen = torch.Generator().manual_seed(13)
    for keys in (list(ROWS), ["c", "a", "f", "b", "e", "d"]):
        batch = random_kjt(gen, keys, ROWS, 6, weighted=weighted, empty_keys=("d",), id_dtype=id_dtype)
        got = q(batch.kjt).values()
        torch.testing.assert_close(got.double(), _per_feature_reference(q, batch), rtol=1e-5, atol=1e-5)
        assert torch.equal(got, _general_path(monkeypatch, q, batch.kjt))


def _static_bad_batches():
    """(name, KJT, weighted collection?) for batches check_static refuses, keys a..f, 3 samples."""
    keys = list(ROWS)
    lengths = torch.tensor([1, 0, 2] * len(keys))
    ids = torch.cat([torch.tensor([0, 1, 2]) for _ in keys])
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    w = torch.rand(ids.shape[0])
    kjt = jr.KeyedJaggedTensor
    return [("weights on an unweighted collection", kjt(keys, ids, w, lengths=lengths), False),
            ("no weights on a weighted one", kjt(keys, ids, lengths=lengths), True),
            ("too few weights", kjt(keys, ids, w[:-1], lengths=lengths), True),
            ("integer weights", kjt(keys, ids, torch.ones_like(ids), lengths=lengths), True),
            ("float ids", kjt(keys, ids.float(), lengths=lengths), False),
            ("int16 ids", kjt(keys, ids.to(torch.int16), lengths=lengths), False),
            ("2-D ids", kjt(keys, ids.view(-1, 1), lengths=lengths), False),
            ("offsets one short", kjt(keys, ids, lengths=lengths, offsets=offsets[:-1], stride=3), False),
            ("lengths one long", kjt(keys, ids, lengths=F.pad(lengths, (0, 1)), stride=3), False),
            ("2-D lengths", kjt(keys, ids, lengths=lengths.view(len(keys), 3), stride=3), False)]


@pytest.mark.parametrize("case", range(10))
def test_shape_errors_are_the_float_collections(case):
    """The one-expression shape check lets nothing through that validation.check_static refuses,
    which then words the error as for the float collection."""
    name, kjt, weighted = _static_bad_batches()[case]
    ebc = _float_module(weighted)
    q = quant.EmbeddingBagCollection.from_float(ebc, DataType.INT8)
    with pytest.raises((ValueError, TypeError)) as expected:
        ebc(kjt)
    with pytest.raises(type(expected.value)) as got:
        q(kjt)
    assert str(got.value) == str(expected.value), name


def test_kept_row_views_follow_the_buffers():
    """The tables' row views are kept per buffer: weights loaded in place, a buffer replaced
    (load_state_dict(assign=True)) and one whose storage moved (set_) are all read anew; the
    float64 reference decodes the rows the module holds at each step."""
    q = _int8_module(3)
    rows = {f"f{i}": 30 + i for i in range(3)}
    batch = random_kjt(torch.Generator().manual_seed(14), list(rows), rows, 8)

    def check():
        torch.testing.assert_close(q(batch.kjt).values().double(), _per_feature_reference(q, batch),
                                   rtol=1e-5, atol=1e-5)

    check()
    gen = torch.Generator().manual_seed(15)
    state = q.state_dict()
    before = q(batch.kjt).values()
    for name in state:  # codes changed in place, scale and bias kept: a different output
        t = state[name]
        t[:, :16].copy_(torch.randint(0, 256, t[:, :16].shape, generator=gen, dtype=torch.uint8))
    check()
    assert not torch.equal(q(batch.kjt).values(), before)
    replaced = {name: t.clone() for name, t in q.state_dict().items()}
    for t in replaced.values():
        t[:, :16] = 255 - t[:, :16]
    q.load_state_dict(replaced, assign=True)
    check()
    q.qweights_int8.set_(q.qweights_int8.clone())  # same tensor, new storage
    for t in q.state_dict().values():  # views of the new storage
        t[:, :16] = 255 - t[:, :16]
    check()


@pytest.mark.parametrize("lengths_dtype,offsets_dtype", [(torch.int64, torch.int32), (torch.int32, torch.int64),
                                                         (torch.int32, torch.int32)])
def test_lengths_and_offsets_of_other_dtypes_given_together(lengths_dtype, offsets_dtype):
    """Given both, the offsets are compared with the lengths' running sum in the offsets'
    dtype: the output of the lengths alone, and a disagreement still refused in the float
    collection's words."""
    q = _int8_module(3)
    rows = {f"f{i}": 30 + i for i in range(3)}
    batch = random_kjt(torch.Generator().manual_seed(16), list(rows), rows, 8)
    lengths = batch.kjt.lengths().to(lengths_dtype)
    offsets = F.pad(lengths.long().cumsum(0), (1, 0)).to(offsets_dtype)
    keys, values = batch.kjt.keys(), batch.kjt.values()
    expected = q(jr.KeyedJaggedTensor(keys, values, lengths=lengths)).values()
    assert torch.equal(q(jr.KeyedJaggedTensor(keys, values, lengths=lengths, offsets=offsets)).values(), expected)
    disagree = offsets.clone()
    disagree[5] += 1
    kjt = jr.KeyedJaggedTensor(keys, values, lengths=lengths, offsets=disagree)
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=30 + i,
                                                           feature_names=[f"f{i}"]) for i in range(3)])
    with pytest.raises(ValueError) as want:
        ebc(kjt)
    with pytest.raises(ValueError) as got:
        q(kjt)
    assert str(got.value) == str(want.value)
