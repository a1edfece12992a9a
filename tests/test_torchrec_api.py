"""TorchRec API behaviours that TorchRec's own tests check (see ``tests/torchrec_suite``), each
tested here without a TorchRec checkout: VBE KJTs, meta tensors, torch.fx, and the smaller
methods. Where real TorchRec is installed, VBE KJTs are compared with its answers."""

from __future__ import annotations

import pytest
import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

import jaggedrec as jr
from jaggedrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor


def _random_vbe(gen, keys, weighted=True, ranks=1):
    strides = [[int(torch.randint(0, 4, (1,), generator=gen)) for _ in range(ranks)] for _ in keys]
    strides[0] = [0] * ranks  # a key with no bags at all
    lengths = torch.randint(0, 3, (sum(map(sum, strides)),), generator=gen, dtype=torch.int32)
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return dict(keys=list(keys), values=values, weights=weights, lengths=lengths, stride_per_key_per_rank=strides)


def _same_kjt(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ("values", "lengths", "offsets", "weights_or_none"):
        a, b = getattr(ours, name)(), getattr(theirs, name)()
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert ours.stride() == theirs.stride()
    assert ours.stride_per_key() == theirs.stride_per_key()
    assert ours.length_per_key() == theirs.length_per_key() and ours.offset_per_key() == theirs.offset_per_key()
    assert ours.variable_stride_per_key() == theirs.variable_stride_per_key()
    assert ours.stride_per_key_per_rank() == theirs.stride_per_key_per_rank()
    assert str(ours) == str(theirs)


@pytest.mark.parametrize("seed", range(4))
def test_vbe_kjt_operations_match_torchrec(seed):
    tr = pytest.importorskip("torchrec.sparse.jagged_tensor")
    gen = torch.Generator().manual_seed(seed)
    args = _random_vbe(gen, ["a", "b", "c", "d"], weighted=seed % 2 == 0, ranks=1 + seed % 2)
    ours, theirs = KeyedJaggedTensor(**args), tr.KeyedJaggedTensor(**args)
    _same_kjt(ours, theirs)
    order = [2, 0, 3, 3, 1]
    _same_kjt(ours.permute(order), theirs.permute(order))
    for a, b in zip(ours.split([1, 0, 3]), theirs.split([1, 0, 3])):
        assert a.keys() == b.keys() and a.stride() == b.stride()
        torch.testing.assert_close(a.values(), b.values(), rtol=0, atol=0)
        torch.testing.assert_close(a.lengths(), b.lengths(), rtol=0, atol=0)
    for key, jt in ours.to_dict().items():
        ref = theirs.to_dict()[key]
        torch.testing.assert_close(jt.lengths(), ref.lengths(), rtol=0, atol=0)
        torch.testing.assert_close(jt.offsets(), ref.offsets(), rtol=0, atol=0)
        torch.testing.assert_close(jt.values(), ref.values(), rtol=0, atol=0)
    _same_kjt(KeyedJaggedTensor.concat([ours, ours.permute([1, 0])]),
              tr.KeyedJaggedTensor.concat([theirs, theirs.permute([1, 0])]))
    _same_kjt(KeyedJaggedTensor.from_jt_dict(ours.to_dict()), tr.KeyedJaggedTensor.from_jt_dict(theirs.to_dict()))


def test_vbe_kjt_views_permute_split_concat_and_str():
    """Worked by hand (the TorchRec comparison above needs torchrec installed). Keys a, b, c with
    2, 0 and 3 bags: a = [[1, 2], []], b = [], c = [[3], [4, 5], [6]]."""
    kjt = KeyedJaggedTensor(["a", "b", "c"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([.5, 1, 2, 3, 4, 5]),
                            lengths=torch.tensor([2, 0, 1, 2, 1], dtype=torch.int32),
                            stride_per_key_per_rank=[[1, 1], [0, 0], [2, 1]])
    assert kjt.stride() == 3 and kjt.stride_per_key() == [2, 0, 3] and kjt.lengths_offset_per_key() == [0, 2, 2, 5]
    assert kjt.length_per_key() == [2, 0, 4] and kjt.offset_per_key() == [0, 2, 2, 6]
    c = kjt["c"]
    assert c.values().tolist() == [3, 4, 5, 6] and c.lengths().tolist() == [1, 2, 1]
    assert c.offsets().tolist() == [0, 1, 3, 4] and c.weights().tolist() == [2, 3, 4, 5]
    assert kjt.to_dict()["b"].lengths().numel() == 0 and kjt.to_dict()["b"].offsets().tolist() == [0]
    swapped = kjt.permute([2, 0, 0])
    assert swapped.keys() == ["c", "a", "a"] and swapped.stride_per_key() == [3, 2, 2]
    assert swapped.values().tolist() == [3, 4, 5, 6, 1, 2, 1, 2]
    assert swapped.lengths().tolist() == [1, 2, 1, 2, 0, 2, 0]
    assert swapped.stride_per_key_per_rank() == [[2, 1], [1, 1], [1, 1]] and swapped.inverse_indices_or_none() is None
    head, tail = kjt.split([2, 1])
    assert head.keys() == ["a", "b"] and head.lengths().tolist() == [2, 0] and head.stride() == 3
    assert tail.values().tolist() == [3, 4, 5, 6] and tail.stride_per_key_per_rank() == [[2, 1]]
    joined = KeyedJaggedTensor.concat([tail, head])
    assert joined.keys() == ["c", "a", "b"] and joined.stride_per_key() == [3, 2, 0]
    assert joined.lengths().tolist() == [1, 2, 1, 2, 0] and joined.values().tolist() == [3, 4, 5, 6, 1, 2]
    with pytest.raises(ValueError, match="VBE"):
        plain = KeyedJaggedTensor(["d"], torch.tensor([7]), torch.ones(1), lengths=torch.tensor([1]))
        KeyedJaggedTensor.concat([kjt, plain])
    assert str(KeyedJaggedTensor(["a", "c"], torch.tensor([1, 2, 3, 4, 5, 6]), lengths=torch.tensor([2, 0, 1, 2, 1]),
                                 stride_per_key_per_rank=[[2], [3]])) == (
        'KeyedJaggedTensor({\n    "a": [[1, 2], []],\n    "c": [[3], [4, 5], [6]]\n})\n')


def test_vbe_stride_pytree_and_empty_like():
    inverse = torch.tensor([[0, 1, 0], [0, 0, 0]])
    kjt = KeyedJaggedTensor(["f1", "f2"], torch.tensor([5, 6, 7, 1, 2]), lengths=torch.tensor([3, 1, 1]),
                            stride_per_key_per_rank=[[2], [1]], inverse_indices=(["f1", "f2"], inverse))
    assert kjt.stride() == 3  # the inverse indices' width, not the largest B_k (2)
    assert kjt.stride_per_key() == [2, 1] and kjt.lengths_offset_per_key() == [0, 2, 3]
    assert KeyedJaggedTensor(["f1", "f2"], kjt.values(), lengths=kjt.lengths(),
                             stride_per_key_per_rank=[[2], [1]]).stride() == 2
    leaves, spec = pytree.tree_flatten(kjt)
    back = pytree.tree_unflatten(leaves, spec)
    assert back.stride_per_key_per_rank() == [[2], [1]] and back.inverse_indices()[0] == ["f1", "f2"]
    assert torch.equal(back.inverse_indices()[1], inverse) and back.stride() == 3
    with pytest.raises(ValueError):
        pytree.tree_unflatten(leaves + leaves, spec)
    empty = KeyedJaggedTensor.empty_like(kjt)
    assert empty.keys() == [] and empty.variable_stride_per_key() and empty.values().numel() == 0
    assert empty.stride_per_key_per_rank() == [[2], [1]]
    buffer = KeyedJaggedTensor.empty_like(kjt, device=torch.device("cpu"))
    assert buffer.keys() == kjt.keys() and buffer.values().shape == kjt.values().shape
    assert buffer.inverse_indices()[1].shape == inverse.shape
    moved = kjt.to(torch.device("cpu"), dtype=torch.float64)
    assert moved.inverse_indices()[1] is not None and moved.stride_per_key() == [2, 1]


def test_vbe_errors_are_lazy_and_clear():
    # TorchRec builds malformed VBE KJTs and lets its validator report them; so does this one
    odd = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 2]),
                            stride_per_key_per_rank=torch.IntTensor([2, 2]))
    assert odd.variable_stride_per_key() and odd.stride_per_key() == []
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4,
                                                           feature_names=["a"])])
    with pytest.raises(ValueError, match=r"stride_per_key_per_rank must be \[keys, ranks\]"):
        ebc(odd)
    bare = KeyedJaggedTensor(["a"], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="neither lengths nor offsets"):
        bare.lengths()
    with pytest.raises(ValueError, match="neither lengths nor offsets"):
        ebc(bare)


def test_small_methods():
    jt = JaggedTensor(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), weights=torch.rand(3),
                      lengths=torch.tensor([1, 2], dtype=torch.int32))
    assert jt.size_in_bytes() == 3 * 8 + 3 * 4 + 2 * 4
    jt.offsets()
    assert jt.size_in_bytes() == 3 * 8 + 3 * 4 + 2 * 4 + 3 * 4
    empty = JaggedTensor.empty_like(jt)
    assert empty.values().dtype == torch.float64 and empty.lengths().dtype == torch.int32
    assert empty.values().numel() == 0 and empty.weights().numel() == 0
    blank = JaggedTensor.empty(is_weighted=True, values_dtype=torch.int64, weights_dtype=torch.float16,
                               lengths_dtype=torch.int64)
    assert (blank.values().dtype, blank.weights().dtype, blank.lengths().dtype) == (
        torch.int64, torch.float16, torch.int64)
    assert blank.offsets().numel() == 0
    kt = KeyedTensor(["x", "y"], [2, 3], torch.rand(4, 5, dtype=torch.float64))
    assert kt.size_in_bytes() == 4 * 5 * 8
    assert kt._key_indices() == {"x": 0, "y": 1}  # TorchRec's regroup helpers read it

    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 0, 2, 1]))
    assert kjt.length_per_key_or_none() is None and kjt.offset_per_key_or_none() is None
    kjt.sync()
    assert kjt.length_per_key_or_none() == [1, 3] and kjt.offset_per_key_or_none() == [0, 1, 4]
    assert kjt.unsync().length_per_key_or_none() is None and kjt.offset_per_key_or_none() is None
    lazy = kjt.to_dict(compute_offsets=False)
    assert lazy["b"].offsets_or_none() is None and lazy["b"].lengths().tolist() == [2, 1]
    assert kjt.to_dict()["b"].offsets().tolist() == [0, 2, 3]
    assert kjt.size_in_bytes() == 4 * 8 + 4 * 8
    assert kjt.clear_storage() == 4 * 8 + 4 * 8
    assert kjt.values().untyped_storage().nbytes() == 0 and kjt.lengths().untyped_storage().nbytes() == 0


def test_keyed_tensor_flatten_spec_follows_the_spec_key_order():
    a, b = torch.rand(3, 2), torch.rand(3, 1)
    _, spec = pytree.tree_flatten(KeyedTensor.from_tensor_list(["a", "b"], [a, b]))
    (flat,) = fx_pytree.tree_flatten_spec(KeyedTensor.from_tensor_list(["b", "a"], [b, a]), spec)
    torch.testing.assert_close(flat, torch.cat([a, b], dim=1), rtol=0, atol=0)


def test_from_dense_and_lengths_dtypes():
    jt = JaggedTensor.from_dense([torch.tensor([1.0]), torch.tensor([]), torch.tensor([2.0, 3.0])])
    assert jt.lengths().dtype == torch.int32 and jt.lengths().tolist() == [1, 0, 2]
    assert jt.offsets().dtype == torch.int32 and jt.offsets().tolist() == [0, 1, 1, 3]
    # an empty float tensor means "no bags" (torch.tensor([]) is float); a non-empty one is refused
    assert JaggedTensor(torch.tensor([]), lengths=torch.tensor([])).lengths().numel() == 0
    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([]), lengths=torch.tensor([]))
    assert kjt.stride() == 0 and kjt.length_per_key() == [0, 0]
    for error in (TypeError, AssertionError):  # ours, and TorchRec's
        with pytest.raises(error, match="lengths must be an integer tensor"):
            KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2.0]))


def test_padded_dense_of_rows_and_printing():
    values = torch.arange(12).view(4, 3)  # [N, D]: one 3-wide row per id; the last row is in no bag
    jt = JaggedTensor(values, weights=values.float() / 10, lengths=torch.tensor([1, 0, 2]))
    padded = jt.to_padded_dense(desired_length=3, padding_value=-1)
    assert padded.shape == (3, 3, 3) and padded.dtype == torch.int64
    assert padded[0].tolist() == [[0, 1, 2], [-1, -1, -1], [-1, -1, -1]]
    assert padded[1].eq(-1).all() and padded[2, :2].tolist() == [[3, 4, 5], [6, 7, 8]]
    assert torch.allclose(jt.to_padded_dense_weights(2)[2], values[1:3].float() / 10)
    assert str(JaggedTensor(values, lengths=torch.tensor([1, 0, 2]))) == (
        "JaggedTensor({\n    [[[0, 1, 2]], [], [[3, 4, 5], [6, 7, 8]]]\n})\n")
    with pytest.raises(ValueError, match="cannot print 3-D values"):
        str(JaggedTensor(values.view(4, 3, 1), lengths=torch.tensor([1, 0, 2])))


def test_collection_device_and_learning_rate():
    config = jr.EmbeddingBagConfig(name="t", embedding_dim=3, num_embeddings=10, feature_names=["f"])
    assert jr.EmbeddingBagCollection([config]).device == torch.device("cpu")
    assert jr.EmbeddingBagCollection([config], device="meta").device == torch.device("meta")
    with torch.device("meta"):
        assert jr.EmbeddingBagCollection([config]).device == torch.device("meta")
    plain = jr.EmbeddingBagCollection([config])
    # nn.Module words the AttributeError (its __getattr__ takes over from the property's)
    with pytest.raises(AttributeError, match="learning_rate"):
        plain.learning_rate
    assert getattr(plain, "learning_rate", None) is None


def test_meta_tensors_never_read_back():
    meta = torch.device("meta")
    kjt = KeyedJaggedTensor(["a", "b", "c"], torch.arange(10, device=meta), torch.rand(10, device=meta),
                            lengths=torch.tensor([2, 0, 1, 1, 3, 3], device=meta))
    assert kjt.sync().length_per_key() == [4, 3, 3]  # a split that adds up: there is nothing to read
    assert kjt["b"].values().shape == (3,) and kjt["b"].values().is_meta
    rebuilt = KeyedJaggedTensor.from_jt_dict(kjt.unsync().to_dict())
    assert rebuilt.keys() == ["a", "b", "c"] and rebuilt.values().is_meta
    KeyedJaggedTensor.from_offsets_sync(["a", "b", "c"], kjt.values(), torch.arange(7, device=meta))
    configs = [jr.EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["a", "c"]),
               jr.EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["b"])]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, device=meta)
    out = ebc(kjt)
    assert out.values().shape == (2, 10) and out.values().is_meta and out.offset_per_key() == [0, 3, 6, 10]


def _fx_roundtrip(module, *args):
    gm = torch.fx.symbolic_trace(module)
    return gm, gm(*args), module(*args)


def test_fx_traces_constructors_concat_and_regroup():
    class MakeJT(torch.nn.Module):
        def forward(self, values, weights, lengths):
            return JaggedTensor(values, weights, lengths)

    gm, traced, eager = _fx_roundtrip(MakeJT(), torch.tensor([3, 4, 5]), torch.rand(3), torch.tensor([2, 1]))
    assert "JaggedTensor" in gm.code and torch.equal(traced.offsets(), eager.offsets())

    dense_lengths = torch.fx.symbolic_trace(JaggedTensor.from_dense_lengths)
    jt = dense_lengths(torch.arange(6).view(2, 3), torch.tensor([1, 3]))  # traced without weights
    assert jt.values().tolist() == [0, 3, 4, 5] and jt.weights_or_none() is None

    class Concat(torch.nn.Module):
        def forward(self, kjts):
            return KeyedJaggedTensor.concat(kjts)

    first = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2, 0], dtype=torch.int32))
    second = KeyedJaggedTensor(["b", "c"], torch.tensor([3, 4, 5]), lengths=torch.tensor([1, 0, 1, 1]))
    gm, traced, eager = _fx_roundtrip(Concat(), [first, second])
    assert traced.keys() == ["a", "b", "c"] and torch.equal(traced.values(), eager.values())
    assert traced.length_per_key() == [2, 1, 2]

    class Regroup(torch.nn.Module):
        def forward(self, kts):
            grouped = KeyedTensor.regroup(kts, [["y", "x"], ["z"]])
            named = KeyedTensor.regroup_as_dict(kts, [["z", "x"]], ["zx"])
            return grouped, named

    kts = [KeyedTensor.from_tensor_list(["x", "y"], [torch.rand(2, 1), torch.rand(2, 2)]),
           KeyedTensor.from_tensor_list(["z"], [torch.rand(2, 3)])]
    gm, (grouped, named), (eager_grouped, eager_named) = _fx_roundtrip(Regroup(), kts)
    assert all(torch.equal(a, b) for a, b in zip(grouped, eager_grouped))
    assert torch.equal(named["zx"], eager_named["zx"]) and named["zx"].shape == (2, 4)


@pytest.mark.parametrize("data_types", [("FP32", "FP32"), ("FP32", "FP16")])
def test_fx_traces_the_collection_and_reads_each_batch_afresh(data_types):
    configs = [jr.EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1", "f3"],
                                     data_type=jr.DataType[data_types[0]]),
               jr.EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"],
                                     data_type=jr.DataType[data_types[1]])]
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True)
    gm = torch.fx.symbolic_trace(ebc)
    gen = torch.Generator().manual_seed(0)
    for keys in (["f1", "f3", "f2"], ["f2", "f1", "f3"]):  # the key order is read when the graph runs
        kjt = KeyedJaggedTensor(keys, torch.randint(0, 10, (12,), generator=gen), torch.rand(12, generator=gen),
                                lengths=torch.tensor([2, 2, 0, 2, 2, 4]))
        traced, eager = gm(kjt), ebc(kjt)
        assert traced.keys() == ["f1", "f3", "f2"] and traced.offset_per_key() == [0, 3, 6, 10]
        torch.testing.assert_close(traced.values(), eager.values(), rtol=0, atol=0)
    vbe = KeyedJaggedTensor(["f1", "f2", "f3"], torch.tensor([1, 2, 3, 4, 5]), torch.rand(5),
                            lengths=torch.tensor([2, 1, 1, 1]), stride_per_key_per_rank=[[1], [2], [1]],
                            inverse_indices=(["f1", "f2", "f3"], torch.tensor([[0, 0], [1, 0], [0, 0]])))
    torch.testing.assert_close(gm(vbe).values(), ebc(vbe).values(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"features \['f3'\] are configured but missing"):
        gm(KeyedJaggedTensor(["f1", "f2"], torch.tensor([1]), torch.rand(1), lengths=torch.tensor([1, 0])))
