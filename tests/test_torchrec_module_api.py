"""TorchRec's module-level API in ``jaggedrec.sparse.jagged_tensor``: ``jt_is_equal``,
``kjt_is_equal``, ``regroup_kts``, ``permute_multi_embedding``, ``ComputeKJTToJTDict``,
``ComputeJTDictToKJT``, ``flatten_kjt_list`` / ``unflatten_kjt_list``.

Each case is built twice from the same arguments, once with jaggedrec's classes and once with
TorchRec's, and jaggedrec's function must answer what TorchRec's answers (those tests skip
without TorchRec); the round trips and errors are checked without it.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import jaggedrec.sparse.jagged_tensor as jt_module
from jaggedrec.sparse.jagged_tensor import (ComputeJTDictToKJT, ComputeKJTToJTDict, JaggedTensor, KeyedJaggedTensor,
                                            KeyedTensor, flatten_kjt_list, jt_is_equal, kjt_is_equal,
                                            permute_multi_embedding, regroup_kts, unflatten_kjt_list)


def _torchrec():
    return pytest.importorskip("torchrec.sparse.jagged_tensor")


def _same_tensor(a, b) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- jt_is_equal --------------------------------------------------------------------------------

LENGTHS = torch.tensor([1, 0, 2, 3], dtype=torch.int32)
OFFSETS = torch.tensor([0, 1, 1, 3, 6], dtype=torch.int32)
VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])

# (name, first JT's arguments, second JT's arguments)
JT_CASES = [
    ("lengths vs offsets", dict(values=VALUES, lengths=LENGTHS), dict(values=VALUES, offsets=OFFSETS)),
    ("both given vs lengths", dict(values=VALUES, lengths=LENGTHS, offsets=OFFSETS),
     dict(values=VALUES, lengths=LENGTHS)),
    ("other values", dict(values=VALUES, lengths=LENGTHS), dict(values=VALUES + 1, lengths=LENGTHS)),
    ("values within allclose", dict(values=VALUES, lengths=LENGTHS), dict(values=VALUES + 1e-7, lengths=LENGTHS)),
    ("other lengths", dict(values=VALUES, lengths=LENGTHS), dict(values=VALUES, lengths=LENGTHS.flip(0))),
    ("fewer values", dict(values=VALUES, lengths=LENGTHS), dict(values=VALUES[:5], lengths=LENGTHS)),
    ("weights vs none", dict(values=VALUES, lengths=LENGTHS, weights=WEIGHTS), dict(values=VALUES, lengths=LENGTHS)),
    ("same weights", dict(values=VALUES, offsets=OFFSETS, weights=WEIGHTS),
     dict(values=VALUES, lengths=LENGTHS, weights=WEIGHTS.clone())),
    ("other weights", dict(values=VALUES, lengths=LENGTHS, weights=WEIGHTS),
     dict(values=VALUES, lengths=LENGTHS, weights=WEIGHTS * 2)),
    ("no bags", dict(values=VALUES[:0], lengths=LENGTHS[:0]), dict(values=VALUES[:0], offsets=OFFSETS[:1])),
]


@pytest.mark.parametrize("case", JT_CASES, ids=[c[0] for c in JT_CASES])
def test_jt_is_equal_answers_as_torchrec(case):
    tr = _torchrec()
    _, first, second = case
    expected = tr.jt_is_equal(tr.JaggedTensor(**first), tr.JaggedTensor(**second))
    assert jt_is_equal(JaggedTensor(**first), JaggedTensor(**second)) == expected
    assert jt_is_equal(JaggedTensor(**second), JaggedTensor(**first)) == expected
    # TorchRec's own objects, or one of each, are compared the same way
    assert jt_is_equal(tr.JaggedTensor(**first), JaggedTensor(**second)) == expected


def test_jt_is_equal_without_torchrec():
    jt = JaggedTensor(VALUES, lengths=LENGTHS)
    assert jt_is_equal(jt, JaggedTensor(VALUES.clone(), offsets=OFFSETS))
    assert not jt_is_equal(jt, JaggedTensor(VALUES, lengths=LENGTHS.flip(0)))
    assert not jt_is_equal(jt, "not a jagged tensor") and not jt_is_equal(None, jt)
    # TorchRec's helper raises on dtypes that differ; here they are simply not the same tensors
    assert not jt_is_equal(jt, JaggedTensor(VALUES, lengths=LENGTHS.long()))


# --- kjt_is_equal -------------------------------------------------------------------------------

KEYS = ["index_0", "index_1"]
KJT_VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
KJT_LENGTHS = torch.tensor([2, 0, 1, 1, 1, 3, 0, 0], dtype=torch.int32)
KJT_OFFSETS = torch.tensor([0, 2, 2, 3, 4, 5, 8, 8, 8], dtype=torch.int32)


def _kjt_cases(cls) -> Dict[str, tuple]:
    """Pairs of KJTs of class ``cls`` (jaggedrec's or TorchRec's), by name."""
    base = lambda **kw: cls(**{"keys": KEYS, "values": KJT_VALUES, **kw})  # noqa: E731
    vbe = lambda strides, inverse=None: cls(  # noqa: E731
        KEYS, KJT_VALUES[:3], lengths=torch.tensor([1, 0, 2]), stride_per_key_per_rank=strides,
        inverse_indices=None if inverse is None else (KEYS, inverse))
    return {
        "offsets vs lengths synced": (base(offsets=KJT_OFFSETS), cls.from_lengths_sync(KEYS, KJT_VALUES, KJT_LENGTHS)),
        "keys reordered": (base(offsets=KJT_OFFSETS), base(keys=KEYS[::-1], offsets=KJT_OFFSETS)),
        "other values": (base(lengths=KJT_LENGTHS), base(values=KJT_VALUES.flip(0), lengths=KJT_LENGTHS)),
        "fewer keys": (base(offsets=KJT_OFFSETS), base(keys=KEYS[:1], offsets=KJT_OFFSETS)),
        "weighted vs not": (base(offsets=KJT_OFFSETS), cls.from_offsets_sync(KEYS, KJT_VALUES, KJT_OFFSETS,
                                                                             weights=KJT_VALUES / 10)),
        "other lengths": (base(lengths=KJT_LENGTHS), base(lengths=KJT_LENGTHS.flip(0))),
        "given ids per key differ": (base(offsets=KJT_OFFSETS, length_per_key=[4, 4], offset_per_key=[0, 4, 8]),
                                     base(offsets=KJT_OFFSETS, length_per_key=[3, 5], offset_per_key=[0, 3, 8])),
        "only offsets vs all given": (base(offsets=KJT_OFFSETS),
                                      base(offsets=KJT_OFFSETS, lengths=KJT_LENGTHS, weights=KJT_VALUES)),
        "bags of a batch of 3": (base(lengths=KJT_LENGTHS), base(lengths=KJT_LENGTHS[:6])),
        "values within allclose": (base(lengths=KJT_LENGTHS), base(values=KJT_VALUES + 1e-7, lengths=KJT_LENGTHS)),
        "empty": (cls.empty(), cls.empty()),
        "empty weighted vs not": (cls.empty(is_weighted=True), cls.empty()),
        # TorchRec compares neither the VBE strides nor the inverse indices
        "vbe strides differ": (vbe([[2], [1]]), vbe([[1], [2]])),
        "vbe inverse indices differ": (vbe([[2], [1]], torch.tensor([[0, 1], [0, 0]])),
                                       vbe([[2], [1]], torch.tensor([[1, 1], [0, 0]]))),
    }


KJT_CASE_NAMES = list(_kjt_cases(KeyedJaggedTensor))


@pytest.mark.parametrize("name", KJT_CASE_NAMES)
def test_kjt_is_equal_answers_as_torchrec(name):
    tr = _torchrec()
    expected = tr.kjt_is_equal(*_kjt_cases(tr.KeyedJaggedTensor)[name])
    ours = _kjt_cases(KeyedJaggedTensor)[name]
    assert kjt_is_equal(*ours) == expected
    assert kjt_is_equal(*ours[::-1]) == expected
    assert kjt_is_equal(_kjt_cases(tr.KeyedJaggedTensor)[name][0], _kjt_cases(KeyedJaggedTensor)[name][1]) == expected


def test_kjt_is_equal_without_torchrec():
    cases = _kjt_cases(KeyedJaggedTensor)
    assert kjt_is_equal(*cases["offsets vs lengths synced"]) and not kjt_is_equal(*cases["keys reordered"])
    assert not kjt_is_equal(*cases["given ids per key differ"]) and not kjt_is_equal(*cases["bags of a batch of 3"])
    assert not kjt_is_equal(cases["empty"][0], JaggedTensor(VALUES, lengths=LENGTHS))
    assert not kjt_is_equal(cases["empty"][0], {"index_0": None})


# --- regroup_kts and permute_multi_embedding ----------------------------------------------------

def _keyed_tensors(cls, gen: torch.Generator) -> List:
    """Two pooled outputs of batch 3; "y" is in both (odd dims, shuffled keys). float32: FBGEMM's
    CPU regroup takes no other; the results are copies, and gradients sums of at most two."""
    a = cls(["x", "y", "w"], [2, 3, 1], torch.randn(3, 6, generator=gen))
    b = cls(["z", "y"], [1, 3], torch.randn(3, 4, generator=gen))
    return [a, b]


GROUPS = [
    [["y", "x"], ["z"], ["w"]],  # every key once, except the y both hold
    [["x", "y"], ["y", "z"]],  # y in two groups
    [["w"], [], ["z", "x"]],  # an empty group, and keys left out
]


def _regrouped_with_grads(cls, fn, groups, seed):
    """``fn``'s outputs, and the gradient of a random weighting of them on each input."""
    kts = _keyed_tensors(cls, torch.Generator().manual_seed(seed))
    leaves = [kt.values().requires_grad_() for kt in kts]
    out = fn(kts, groups)
    gen = torch.Generator().manual_seed(seed + 100)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in out)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in out], [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]


@pytest.mark.parametrize("groups", GROUPS, ids=["once", "twice", "empty group"])
@pytest.mark.parametrize("name", ["regroup_kts", "permute_multi_embedding", "regroup"])
def test_regrouping_matches_torchrec_values_and_gradients(name, groups):
    """A key both KeyedTensors hold comes from the first for TorchRec's functions, from the last
    for its KeyedTensor.regroup: jaggedrec's must take it from the same one."""
    tr = _torchrec()
    ours_fn = {"regroup_kts": regroup_kts, "permute_multi_embedding": permute_multi_embedding,
               "regroup": KeyedTensor.regroup}[name]
    theirs_fn = getattr(tr.KeyedTensor, name) if name == "regroup" else getattr(tr, name)
    out, grads = _regrouped_with_grads(KeyedTensor, ours_fn, groups, seed=5)
    ref_out, ref_grads = _regrouped_with_grads(tr.KeyedTensor, theirs_fn, groups, seed=5)
    assert len(out) == len(ref_out)
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape
        _same_tensor(a, b)
    # gradients of the blocks read; FBGEMM's backward leaves the others' memory unwritten, and
    # jaggedrec's are zero there
    kts = _keyed_tensors(KeyedTensor, torch.Generator())
    holder: Dict[str, int] = {}
    for i, kt in enumerate(kts):
        for key in kt.keys():
            if name == "regroup" or key not in holder:  # regroup: the last holder; the others: the first
                holder[key] = i
    used = {key for group in groups for key in group}
    for i, kt in enumerate(kts):
        for key, start, width in zip(kt.keys(), kt.offset_per_key(), kt.length_per_key()):
            ours, theirs = grads[i][:, start:start + width], ref_grads[i][:, start:start + width]
            if key in used and holder[key] == i:
                _same_tensor(ours, theirs)
            else:
                assert ours.eq(0).all()


def test_regroup_kts_takes_a_shared_key_from_the_first_keyed_tensor():
    a = KeyedTensor(["k"], [1], torch.zeros(2, 1))
    b = KeyedTensor(["k"], [1], torch.ones(2, 1))
    assert regroup_kts([a, b], [["k"]])[0].tolist() == [[0.0], [0.0]]
    assert permute_multi_embedding([a, b], [["k"]])[0].tolist() == [[0.0], [0.0]]
    assert KeyedTensor.regroup([a, b], [["k"]])[0].tolist() == [[1.0], [1.0]]
    assert regroup_kts([a], [[]])[0].shape == (2, 0)
    with pytest.raises(KeyError, match=r"regroup_kts: keys \['q'\] are in none of the KeyedTensors"):
        regroup_kts([a, b], [["k", "q"]])


# --- ComputeKJTToJTDict and ComputeJTDictToKJT --------------------------------------------------

def _kjt_args(case: str) -> dict:
    gen = torch.Generator().manual_seed(len(case))
    if case == "vbe":
        lengths = torch.randint(0, 3, (5,), generator=gen)
        strides = [[1, 1], [3, 0]]
        extra = dict(stride_per_key_per_rank=strides, inverse_indices=(["a", "b"], torch.tensor([[0, 1], [2, 0]])))
    else:
        lengths = torch.randint(0, 3, (6,), generator=gen, dtype=torch.int32 if case == "int32" else torch.int64)
        extra = {}
    values = torch.randint(0, 9, (int(lengths.sum()),), generator=gen, dtype=lengths.dtype)
    weights = torch.rand(values.numel(), generator=gen) if case in ("weighted", "vbe") else None
    return dict(keys=["a", "b"], values=values, weights=weights, lengths=lengths, **extra)


@pytest.mark.parametrize("case", ["plain", "int32", "weighted", "vbe"])
def test_kjt_to_jt_dict_module_matches_torchrec(case):
    tr = _torchrec()
    args = _kjt_args(case)
    ours = ComputeKJTToJTDict()(KeyedJaggedTensor(**args))
    theirs = tr.ComputeKJTToJTDict()(tr.KeyedJaggedTensor(**args))
    assert list(ours) == list(theirs)
    for key, jt in ours.items():
        for name in ("values", "lengths", "offsets", "weights_or_none"):
            _same_tensor(getattr(jt, name)(), getattr(theirs[key], name)())
    # TorchRec's KJT goes in as well
    from_theirs = ComputeKJTToJTDict()(tr.KeyedJaggedTensor(**args))
    assert all(jt_is_equal(from_theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("same_batch", [True, False])
def test_jt_dict_to_kjt_module_matches_torchrec(same_batch):
    tr = _torchrec()
    lengths = {"b": torch.tensor([2, 0, 1]), "a": torch.tensor([1, 1, 0] if same_batch else [3])}
    dicts = {lib: {k: cls(torch.arange(int(n.sum())) + 10 * i, lengths=n) for i, (k, n) in enumerate(lengths.items())}
             for lib, cls in (("ours", JaggedTensor), ("theirs", tr.JaggedTensor))}
    ours, theirs = ComputeJTDictToKJT()(dicts["ours"]), tr.ComputeJTDictToKJT()(dicts["theirs"])
    assert ours.keys() == theirs.keys() == ["b", "a"]
    assert ours.stride() == theirs.stride() and ours.stride_per_key() == theirs.stride_per_key()
    assert ours.variable_stride_per_key() == theirs.variable_stride_per_key() == (not same_batch)
    for name in ("values", "lengths", "weights_or_none"):
        _same_tensor(getattr(ours, name)(), getattr(theirs, name)())
    assert ours.length_per_key() == theirs.length_per_key()


# --- flatten_kjt_list / unflatten_kjt_list -------------------------------------------------------

def test_flatten_kjt_list_round_trip_keeps_the_tensors():
    kjts = [KeyedJaggedTensor(**_kjt_args(case)) for case in ("plain", "weighted", "vbe", "int32")]
    kjts.append(KeyedJaggedTensor.empty())
    tensors, contexts = flatten_kjt_list(kjts)
    assert len(contexts) == len(kjts) and len(tensors) == 4 * 4 + 5  # the VBE KJT adds its inverse indices
    back = unflatten_kjt_list(tensors, contexts)
    for before, after in zip(kjts, back, strict=True):
        assert kjt_is_equal(before, after)
        assert after.values() is before.values() and after.lengths_or_none() is before.lengths_or_none()
        assert after.stride_per_key_per_rank() == before.stride_per_key_per_rank()
        inverse, inverse_after = before.inverse_indices_or_none(), after.inverse_indices_or_none()
        assert (inverse is None) == (inverse_after is None)
        if inverse is not None:
            assert inverse_after[0] == inverse[0] and inverse_after[1] is inverse[1]
    with pytest.raises(ValueError, match="too few"):
        unflatten_kjt_list(tensors[:-1], contexts)
    with pytest.raises(ValueError, match="which take"):
        unflatten_kjt_list(tensors + [None], contexts)


def test_flatten_kjt_list_round_trip_matches_torchrec():
    """TorchRec's pair gives back KJTs equal to the ones flattened; so must ours (the layout of
    the flat list is each library's own)."""
    tr = _torchrec()
    for case in ("plain", "weighted", "int32"):
        args = _kjt_args(case)
        theirs = tr.unflatten_kjt_list(*tr.flatten_kjt_list([tr.KeyedJaggedTensor(**args)]))[0]
        ours = unflatten_kjt_list(*flatten_kjt_list([KeyedJaggedTensor(**args)]))[0]
        assert kjt_is_equal(ours, theirs) and tr.kjt_is_equal(theirs, tr.KeyedJaggedTensor(**args))


def test_module_api_names_are_exported():
    for name in ("jt_is_equal", "kjt_is_equal", "regroup_kts", "permute_multi_embedding", "ComputeKJTToJTDict",
                 "ComputeJTDictToKJT", "flatten_kjt_list", "unflatten_kjt_list", "JaggedTensorMeta"):
        assert name in jt_module.__all__ and hasattr(jt_module, name)
    assert type(KeyedJaggedTensor) is jt_module.JaggedTensorMeta
