"""JaggedTensor, KeyedJaggedTensor and KeyedTensor: TorchRec's API and pytree behaviour."""

import copy

import pytest
import torch
import torch.utils._pytree as pytree

from jaggedrec import JaggedTensor, KeyedJaggedTensor, KeyedTensor


def _kjt(weighted=False):
    # keys f0, f1; batch 3: f0 = [[1, 2], [], [3]], f1 = [[4], [5], [6, 7, 8]]
    weights = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]) if weighted else None
    return KeyedJaggedTensor(["f0", "f1"], torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), weights,
                             lengths=torch.tensor([2, 0, 1, 1, 1, 3]))


def test_jagged_tensor_lengths_offsets_and_dense():
    jt = JaggedTensor(values=torch.tensor([5, 7, 1]), lengths=torch.tensor([1, 2]))
    assert jt.offsets().tolist() == [0, 1, 3]
    assert [t.tolist() for t in jt.to_dense()] == [[5], [7, 1]]
    assert jt.lengths_or_none() is not None and jt.weights_or_none() is None
    from_offsets = JaggedTensor(values=torch.tensor([5, 7, 1]), offsets=torch.tensor([0, 1, 3]))
    assert from_offsets.lengths().tolist() == [1, 2]
    assert from_offsets.lengths_or_none() is not None
    assert str(jt) == "JaggedTensor({\n    [[5], [7, 1]]\n})\n"
    with pytest.raises(ValueError, match="no weights"):
        jt.weights()
    with pytest.raises(ValueError, match="lengths or offsets"):
        JaggedTensor(values=torch.tensor([1]))
    with pytest.raises(TypeError, match="integer"):
        JaggedTensor(values=torch.tensor([1]), lengths=torch.tensor([1.0]))


def test_jagged_tensor_padding_and_from_dense():
    jt = JaggedTensor(values=torch.tensor([3, 4, 5, 6, 7]), weights=torch.tensor([.1, .2, .3, .4, .5]),
                      lengths=torch.tensor([2, 0, 3]))
    assert jt.to_padded_dense().tolist() == [[3, 4, 0], [0, 0, 0], [5, 6, 7]]
    assert jt.to_padded_dense(desired_length=2, padding_value=-1).tolist() == [[3, 4], [-1, -1], [5, 6]]
    assert torch.allclose(jt.to_padded_dense_weights(2), torch.tensor([[.1, .2], [0, 0], [.3, .4]]))
    assert [w.tolist() for w in jt.to_dense_weights()] == [pytest.approx([.1, .2]), [], pytest.approx([.3, .4, .5])]
    back = JaggedTensor.from_dense([torch.tensor([3, 4]), torch.tensor([], dtype=torch.long), torch.tensor([5, 6, 7])])
    assert back.lengths().tolist() == [2, 0, 3] and back.values().tolist() == [3, 4, 5, 6, 7]
    dense = JaggedTensor.from_dense_lengths(torch.tensor([[1, 2, 9], [3, 9, 9]]), torch.tensor([2, 1]))
    assert dense.values().tolist() == [1, 2, 3] and dense.lengths().tolist() == [2, 1]
    assert "\"weights\": [[0.1" in str(jt)


def test_kjt_accessors_and_per_key_views():
    kjt = _kjt(weighted=True)
    assert kjt.keys() == ["f0", "f1"] and kjt.stride() == 3
    assert kjt.offsets().tolist() == [0, 2, 2, 3, 4, 5, 8]
    assert kjt.length_per_key() == [3, 5] and kjt.offset_per_key() == [0, 3, 8]
    f1 = kjt["f1"]
    assert f1.values().tolist() == [4, 5, 6, 7, 8] and f1.lengths().tolist() == [1, 1, 3]
    assert f1.offsets().tolist() == [0, 1, 2, 5]
    assert f1.weights().tolist() == [3.5, 4.5, 5.5, 6.5, 7.5]
    as_dict = kjt.to_dict()
    assert list(as_dict) == ["f0", "f1"] and as_dict["f0"].values().tolist() == [1, 2, 3]
    with pytest.raises(KeyError, match="nope"):
        kjt["nope"]
    from_offsets = KeyedJaggedTensor.from_offsets_sync(["f0", "f1"], kjt.values(), kjt.offsets())
    assert from_offsets.lengths().tolist() == [2, 0, 1, 1, 1, 3] and from_offsets._length_per_key == [3, 5]


def test_kjt_string_matches_torchrec_format():
    assert str(_kjt()) == ('KeyedJaggedTensor({\n    "f0": [[1, 2], [], [3]],\n'
                           '    "f1": [[4], [5], [6, 7, 8]]\n})\n')
    weighted = str(_kjt(weighted=True))
    assert weighted.startswith('KeyedJaggedTensor({\n    "f0": {\n        "values": [[1, 2], [], [3]],\n'
                               '        "weights": [[0.5, 1.5], [], [2.5]]\n    },')
    assert str(KeyedJaggedTensor.empty()) == "KeyedJaggedTensor()\n"


def test_kjt_from_jt_dict_permute_split_concat():
    kjt = _kjt(weighted=True)
    rebuilt = KeyedJaggedTensor.from_jt_dict(kjt.to_dict())
    assert rebuilt.values().tolist() == kjt.values().tolist()
    assert rebuilt.lengths().tolist() == kjt.lengths().tolist()
    swapped = kjt.permute([1, 0])
    assert swapped.keys() == ["f1", "f0"]
    assert swapped.values().tolist() == [4, 5, 6, 7, 8, 1, 2, 3]
    assert swapped.lengths().tolist() == [1, 1, 3, 2, 0, 1]
    assert swapped.weights().tolist() == [3.5, 4.5, 5.5, 6.5, 7.5, 0.5, 1.5, 2.5]
    repeated = kjt.permute([0, 0])
    assert repeated.keys() == ["f0", "f0"] and repeated.values().tolist() == [1, 2, 3, 1, 2, 3]
    first, second = kjt.split([1, 1])
    assert first.keys() == ["f0"] and second.values().tolist() == [4, 5, 6, 7, 8]
    assert second.weights().tolist() == [3.5, 4.5, 5.5, 6.5, 7.5]
    joined = KeyedJaggedTensor.concat([second, first])
    assert joined.keys() == ["f1", "f0"] and joined.values().tolist() == swapped.values().tolist()
    with pytest.raises(ValueError, match="segments"):
        kjt.split([1])
    # features of different batch sizes stack into a VBE KJT, as TorchRec's from_jt_dict does
    vbe = KeyedJaggedTensor.from_jt_dict({"a": JaggedTensor(torch.tensor([1]), lengths=torch.tensor([1])),
                                          "b": JaggedTensor(torch.tensor([2]), lengths=torch.tensor([0, 1]))})
    assert vbe.variable_stride_per_key() and vbe.stride_per_key() == [1, 2]
    assert vbe.stride_per_key_per_rank() == [[1], [2]] and vbe["b"].lengths().tolist() == [0, 1]


def test_kjt_to_device_and_lazy_offsets_keep_dtype():
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2], dtype=torch.int32), lengths=torch.tensor([2, 0], dtype=torch.int32))
    assert kjt.offsets().dtype == torch.int32
    moved = kjt.to(torch.device("cpu"))
    assert moved.device() == torch.device("cpu") and moved.values().tolist() == [1, 2]
    with pytest.raises(TypeError, match="integer"):
        KeyedJaggedTensor(["a"], torch.tensor([1]), lengths=torch.tensor([1.0]))


def test_keyed_tensor_api():
    a, b = torch.arange(6.).view(2, 3), torch.arange(10., 14.).view(2, 2)
    kt = KeyedTensor.from_tensor_list(["a", "b"], [a, b])
    assert kt.keys() == ["a", "b"] and kt.length_per_key() == [3, 2] and kt.offset_per_key() == [0, 3, 5]
    assert torch.equal(kt["b"], b) and torch.equal(kt.to_dict()["a"], a)
    other = KeyedTensor(["c"], [1], torch.tensor([[7.], [8.]]))
    grouped = KeyedTensor.regroup([kt, other], [["b", "c"], ["a"]])
    assert torch.equal(grouped[0], torch.cat([b, other["c"]], 1)) and torch.equal(grouped[1], a)
    as_dict = KeyedTensor.regroup_as_dict([kt, other], [["c"], ["a", "b"]], ["x", "y"])
    assert torch.equal(as_dict["y"], kt.values())
    with pytest.raises(KeyError, match="zz"):
        KeyedTensor.regroup([kt], [["zz"]])
    assert str(kt).startswith('KeyedTensor({\n    "a": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]')
    assert kt.to(torch.device("cpu"))["a"].shape == (2, 3)


def test_pytree_round_trip_drops_batch_size_from_context():
    kjt = _kjt(weighted=True)
    leaves, spec = pytree.tree_flatten(kjt)
    assert all(leaf is None or isinstance(leaf, torch.Tensor) for leaf in leaves)
    back = pytree.tree_unflatten(leaves, spec)
    assert back.keys() == kjt.keys() and back.stride() == 3
    # a batch of another size has the same tree structure: no new graph for torch.compile
    other = KeyedJaggedTensor(["f0", "f1"], torch.tensor([1]), torch.tensor([1.0]), lengths=torch.tensor([1, 0]))
    assert pytree.tree_structure(other) == spec
    kt = KeyedTensor(["a"], [2], torch.ones(3, 2))
    kt_back = pytree.tree_unflatten(*pytree.tree_flatten(kt))
    assert kt_back.keys() == ["a"] and kt_back.values().shape == (3, 2)
    jt = JaggedTensor(torch.tensor([1, 2]), lengths=torch.tensor([2]))
    assert pytree.tree_unflatten(*pytree.tree_flatten(jt)).offsets().tolist() == [0, 2]
    assert copy.deepcopy(kjt).values().tolist() == kjt.values().tolist()


def test_sparse_types_are_dataclasses():
    import dataclasses
    assert all(dataclasses.is_dataclass(c) for c in (JaggedTensor, KeyedJaggedTensor, KeyedTensor))


def test_regroup_takes_a_repeated_key_from_the_last_keyed_tensor():
    first = KeyedTensor(["x", "y"], [1, 2], torch.tensor([[1.0, 2.0, 3.0]]))
    second = KeyedTensor(["y", "z"], [2, 1], torch.tensor([[4.0, 5.0, 6.0]]))
    grouped = KeyedTensor.regroup([first, second], [["y", "x"], ["z"]])
    assert grouped[0].tolist() == [[4.0, 5.0, 1.0]] and grouped[1].tolist() == [[6.0]]
    as_dict = KeyedTensor.regroup_as_dict([first, second], [["y"]], ["g"])
    assert as_dict["g"].tolist() == [[4.0, 5.0]]


def test_regroup_matches_torchrec_when_installed():
    torchrec_kt = pytest.importorskip("torchrec.sparse.jagged_tensor").KeyedTensor
    gen = torch.Generator().manual_seed(0)
    blocks = [(["a", "b", "c"], [2, 1, 3]), (["c", "d"], [3, 2]), (["b", "e", "a"], [1, 1, 2])]
    values = [torch.randn(4, sum(lengths), generator=gen) for _, lengths in blocks]
    groups = [["c", "a"], ["d", "b", "e"], ["a"]]
    ours = KeyedTensor.regroup([KeyedTensor(k, n, v) for (k, n), v in zip(blocks, values)], groups)
    theirs = torchrec_kt.regroup([torchrec_kt(k, n, v) for (k, n), v in zip(blocks, values)], groups)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
