"""The quantized collection's per-layout plan (``jaggedrec/ops/quantized_plan.py``) and the
INT8 calls that read the KJT's ids whole: a small batch of a few features (the TorchRec
tutorial's shape, scaled down) as the eager CPU forward serves it.

References: each feature pooled alone in float64 from its table's rows decoded off the layout
(``test_quant_segments``), TorchRec's quantized collection when installed, torch's op on
re-based offsets, and the float collection's errors word for word.
"""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.ops import quantized_torch
from jaggedrec.ops.feature_tables import STORAGE_INT4, STORAGE_INT8
from jr_testing import random_kjt
from test_quant import _bound
from test_quant_host import _forward_ops
from test_quant_segments import _per_feature_reference

# two tables of different rows (the second key's ids in [30, 41) would be bad ids of the
# first table: a call that read them through the first table would fail or pool wrong rows)
ROWS = {"product": 30, "user": 41}
_PACK = {STORAGE_INT8: torch.ops.quantized.embedding_bag_byte_prepack,
         STORAGE_INT4: torch.ops.quantized.embedding_bag_4bit_prepack}
_OP = {STORAGE_INT8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
       STORAGE_INT4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets}


def _modules(data_type, weighted=False, dims=(16, 16)):
    torch.manual_seed(3)
    configs = [jr.EmbeddingBagConfig(name=f"t_{key}", embedding_dim=dim, num_embeddings=rows, feature_names=[key])
               for (key, rows), dim in zip(ROWS.items(), dims)]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted)
    with torch.no_grad():
        for c in configs:
            w = ebc.embedding_bags[c.name].weight
            w.mul_(torch.rand(w.shape[0], 1) * 3 + 0.1).add_(torch.randn(w.shape[0], 1))
    return ebc, quant.EmbeddingBagCollection.from_float(ebc, data_type)


def _high_ids_batch(gen, keys, id_dtype, weighted=False, empty=(), batch=9):
    """A batch whose ``user`` ids all lie in [30, 41): out of the ``product`` table's range."""
    b = random_kjt(gen, keys, ROWS, batch, weighted=weighted, empty_keys=empty, id_dtype=id_dtype)
    values = b.kjt.values().clone()
    lengths = b.kjt.lengths()
    start = 0
    for k, key in enumerate(keys):
        n = int(lengths[k * batch:(k + 1) * batch].sum())
        if key == "user":
            high = torch.randint(30, 41, (n,), generator=gen).to(id_dtype)
            values[start:start + n] = high
            b.per_key[key] = (high, b.per_key[key][1], b.per_key[key][2])
        start += n
    b.kjt = jr.KeyedJaggedTensor(keys, values, b.kjt.weights_or_none(), lengths=lengths)
    return b


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_whole_ids_probe_holds_on_a_real_batch(id_dtype, weighted, threads):
    """Where the probe says torch's op takes a key's own offsets with all of the KJT's ids, it
    gives the bits of the call on the key's ids and offsets re-based to 0, for each key of a
    3-key batch whose later keys hold ids past the table (left unread)."""
    gen = torch.Generator().manual_seed(21)
    rows = _PACK[STORAGE_INT8](torch.randn(40, 16, generator=gen))
    op, batch = _OP[STORAGE_INT8], 53
    lengths = torch.randint(0, 6, (3 * batch,), generator=gen)
    lengths[::5] = 0
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
    values = torch.randint(0, 40, (int(offsets[-1]),), generator=gen).to(id_dtype)
    values[int(offsets[2 * batch]):] += 1000  # the last key's ids: past the table
    psw = torch.rand(values.shape[0], generator=gen) if weighted else None
    if not quantized_torch.op_takes_unbased_offsets(STORAGE_INT8):
        pytest.skip("this torch's 8-bit op does not take unbased offsets: the module re-bases them")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in range(2):
            lo, hi = int(offsets[k * batch]), int(offsets[(k + 1) * batch])
            own = offsets[k * batch:(k + 1) * batch + 1]
            expected = op(rows, values[lo:hi], own - lo, False, 0, False, None if psw is None else psw[lo:hi],
                          None, True)
            got = op(rows, values, own, False, 0, False, psw, None, True)
            assert torch.equal(got, expected), k
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("keys,empty", [(["product", "user"], ()), (["user", "product"], ()),
                                        (["product", "user"], ("product",)), (["user", "product"], ("user",))])
def test_two_tables_against_the_float64_reference(data_type, id_dtype, weighted, keys, empty):
    """Both keys (in either order, one of them with no ids at all, empty bags) pooled as each
    feature alone in float64, and within the float collection's rounding bound; the second
    table's ids are bad ids of the first."""
    ebc, q = _modules(data_type, weighted, dims=(16, 5) if data_type == DataType.INT4 else (16, 16))
    gen = torch.Generator().manual_seed(22)
    for _ in range(3):
        batch = _high_ids_batch(gen, keys, id_dtype, weighted, empty)
        got = q(batch.kjt).values()
        torch.testing.assert_close(got.double(), _per_feature_reference(q, batch), rtol=1e-5, atol=1e-5)
        assert ((got - ebc(batch.kjt).values()).abs() <= _bound(q, ebc, batch) + 1e-6).all()


@pytest.mark.parametrize("data_type,torch_dtype", [(DataType.INT8, torch.qint8), (DataType.INT4, torch.quint4x2)])
def test_two_tables_agree_with_torchrecs_quantized_module_when_installed(data_type, torch_dtype):
    """TorchRec's quantized collection on the same float tables and KJT (keys shuffled, int32
    ids): the two round rows a little differently, so they agree within twice the bound."""
    torchrec = pytest.importorskip("torchrec")
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as TorchRecQuant
    ebc, q = _modules(data_type)
    configs = [torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim,
                                           num_embeddings=c.num_embeddings, feature_names=c.feature_names)
               for c in ebc.embedding_bag_configs()]
    float_theirs = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    float_theirs.load_state_dict(ebc.state_dict())
    float_theirs.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch_dtype))
    theirs = TorchRecQuant.from_float(float_theirs)
    batch = _high_ids_batch(torch.Generator().manual_seed(23), ["user", "product"], torch.int32)
    kjt = batch.kjt
    mine = q(kjt)
    expected = theirs(torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths()))
    assert mine.keys() == expected.keys()
    assert ((mine.values() - expected.values()).abs() <= 2 * _bound(q, ebc, batch) + 1e-6).all()


@pytest.mark.parametrize("data_type", [DataType.INT8, DataType.INT4])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["lengths", "offsets", "both"])
def test_a_bad_id_in_either_feature_is_named(data_type, id_dtype, layout):
    """An id past its own table (but within the other's) or negative, in either key, refused
    in the float collection's words, naming that key's feature, id and sample."""
    ebc, q = _modules(data_type)
    gen = torch.Generator().manual_seed(24)
    for keys in (["product", "user"], ["user", "product"]):
        batch = random_kjt(gen, keys, ROWS, 6, id_dtype=id_dtype)
        lengths = batch.kjt.lengths()
        offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
        for k, bad in ((0, 35), (1, 35), (0, -1), (1, 41)):
            values = batch.kjt.values().clone()
            first = int(offsets[k * 6])
            if int(offsets[(k + 1) * 6]) == first:
                continue
            if bad == 35 and keys[k] == "user":
                bad = 41
            values[first] = bad
            kjt = jr.KeyedJaggedTensor(keys, values, lengths=None if layout == "offsets" else lengths,
                                       offsets=None if layout == "lengths" else offsets)
            with pytest.raises(ValueError) as expected:
                ebc(kjt)
            with pytest.raises(ValueError) as got:
                q(kjt)
            assert str(got.value) == str(expected.value)
            assert f"'{keys[k]}'" in str(got.value)


def test_int8_keys_slice_no_ids():
    """Both keys of an INT8 batch pool from the KJT's whole ids: no op touches the ids but the
    two pooling calls (main sliced them once per key)."""
    _, q = _modules(DataType.INT8)
    kjt = _high_ids_batch(torch.Generator().manual_seed(25), ["product", "user"], torch.int64).kjt
    if not quantized_torch.op_takes_unbased_offsets(STORAGE_INT8):
        pytest.skip("this torch's 8-bit op does not take unbased offsets")
    ids = kjt.values().untyped_storage().data_ptr()
    touching = [name for name, storages in _forward_ops(q, kjt) if ids in storages]
    assert touching == ["quantized.embedding_bag_byte_rowwise_offsets"] * 2, touching


def test_views_are_dropped_with_their_buffer():
    """A buffer replaced (``load_state_dict(assign=True)``) is freed: the row views kept for it
    do not hold it (main's views, kept per buffer, held it through their base), and views of
    the new buffer serve the next forward."""
    _, q = _modules(DataType.INT8)
    batch = _high_ids_batch(torch.Generator().manual_seed(26), ["product", "user"], torch.int64)
    q(batch.kjt)
    old = weakref.ref(q.qweights_int8)
    q.load_state_dict({name: t.clone() for name, t in q.state_dict().items()}, assign=True)
    assert q.qweights_int8 is not old()
    gc.collect()
    assert old() is None
    torch.testing.assert_close(q(batch.kjt).values().double(), _per_feature_reference(q, batch),
                               rtol=1e-5, atol=1e-5)


def test_module_pickles_and_copies_after_a_forward():
    """A module that has served a batch (its plan holds views and weak references) pickles,
    saves and deep-copies, and the copies serve the same outputs from their own tables."""
    _, q = _modules(DataType.INT4)
    batch = _high_ids_batch(torch.Generator().manual_seed(27), ["user", "product"], torch.int32)
    expected = q(batch.kjt).values()
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    for other in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q), torch.load(buffer, weights_only=False)):
        assert torch.equal(other(batch.kjt).values(), expected)
        with torch.no_grad():
            other.qweights_int4.zero_()
        assert not torch.equal(other(batch.kjt).values(), expected)  # read from its own buffer
        assert torch.equal(q(batch.kjt).values(), expected)
