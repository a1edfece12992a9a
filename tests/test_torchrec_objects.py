"""TorchRec's sparse objects taken as jaggedrec's: ``as_keyed_jagged_tensor``,
``as_jagged_tensor`` and ``as_keyed_tensor`` against real TorchRec objects (skipped without
TorchRec). The result must hold TorchRec's very tensors (same objects, same storage), say
what TorchRec's object says (``to_dict()``, strides, ids per key), and pool as TorchRec's
own modules pool TorchRec's object."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import jaggedrec as jr
from jaggedrec.sparse.jagged_tensor import as_jagged_tensor, as_keyed_jagged_tensor, as_keyed_tensor

KEYS = ["f2", "f0", "f1"]  # not in table order


def _torchrec():
    return pytest.importorskip("torchrec.sparse.jagged_tensor")


def _batch(gen, batch: int, dtype: torch.dtype, weighted: bool):
    """Random bags for KEYS: empty bags, a key with no ids, duplicate ids."""
    lengths = torch.randint(0, 4, (len(KEYS) * batch,), generator=gen, dtype=dtype)
    lengths[batch:2 * batch] = 0  # f0 has no ids in this batch
    values = torch.randint(0, 5, (int(lengths.sum()),), generator=gen, dtype=dtype)
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return values, lengths, weights


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(lengths.dtype)


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> None:
    """``a`` is ``b`` itself (so, the same storage)."""
    assert (a is None) == (b is None)
    if a is not None:
        assert a is b and a.data_ptr() == b.data_ptr()


def _equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _check_kjt(ours: jr.KeyedJaggedTensor, theirs) -> None:
    assert isinstance(ours, jr.KeyedJaggedTensor) and ours.keys() == theirs.keys()
    for name in ("values", "weights_or_none", "lengths_or_none", "offsets_or_none"):
        _same(getattr(ours, name)(), getattr(theirs, name)())
    inverse, their_inverse = ours.inverse_indices_or_none(), theirs.inverse_indices_or_none()
    assert (inverse is None) == (their_inverse is None)
    if inverse is not None:
        assert list(inverse[0]) == list(their_inverse[0])
        _same(inverse[1], their_inverse[1])
    assert ours.stride() == theirs.stride()
    assert ours.variable_stride_per_key() == theirs.variable_stride_per_key()
    assert ours.stride_per_key_per_rank() == theirs.stride_per_key_per_rank()
    assert ours.stride_per_key() == theirs.stride_per_key()
    assert ours.length_per_key() == theirs.length_per_key()
    assert ours.offset_per_key() == theirs.offset_per_key()
    ours_dict, their_dict = ours.to_dict(), theirs.to_dict()
    assert list(ours_dict) == list(their_dict)
    for key, jt in ours_dict.items():
        ref = their_dict[key]
        for name in ("values", "weights_or_none", "lengths", "offsets"):
            _equal(getattr(jt, name)(), getattr(ref, name)())


CASES = ["plain", "weighted", "offsets_only", "lengths_and_offsets"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_torchrec_kjt_becomes_ours_sharing_its_tensors(case, dtype):
    tr = _torchrec()
    gen = torch.Generator().manual_seed(CASES.index(case) + 10 * (dtype == torch.int64))
    values, lengths, weights = _batch(gen, 4, dtype, weighted=case == "weighted")
    given = {"offsets_only": dict(offsets=_offsets(lengths)),
             "lengths_and_offsets": dict(lengths=lengths, offsets=_offsets(lengths))}.get(case, dict(lengths=lengths))
    theirs = tr.KeyedJaggedTensor(KEYS, values, weights, **given)
    ours = as_keyed_jagged_tensor(theirs)
    _check_kjt(ours, theirs)
    assert ours.offsets_or_none() is None if case in ("plain", "weighted") else True


def test_torchrec_kjt_metadata_is_carried_not_recomputed():
    """Ids per key TorchRec already knows come along, so that nothing is read back again."""
    tr = _torchrec()
    values, lengths, _ = _batch(torch.Generator().manual_seed(1), 3, torch.int64, weighted=False)
    theirs = tr.KeyedJaggedTensor.from_lengths_sync(KEYS, values, lengths)
    ours = as_keyed_jagged_tensor(theirs)
    assert ours.length_per_key_or_none() == theirs.length_per_key()
    assert ours.offset_per_key_or_none() == theirs.offset_per_key()
    unsynced = as_keyed_jagged_tensor(tr.KeyedJaggedTensor(KEYS, values, lengths=lengths))
    assert unsynced.length_per_key_or_none() is None  # computed on first use, as for any KJT
    assert unsynced.length_per_key() == theirs.length_per_key()


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_torchrec_vbe_kjt_with_inverse_indices(ranks, dtype):
    tr = _torchrec()
    gen = torch.Generator().manual_seed(ranks + 3 * (dtype == torch.int64))
    batch = 5
    strides = [[2] * ranks, [1] * ranks, [0] * ranks]  # per key and rank; f1 has no bags at all
    lengths = torch.randint(0, 3, (sum(map(sum, strides)),), generator=gen, dtype=dtype)
    values = torch.randint(0, 5, (int(lengths.sum()),), generator=gen, dtype=dtype)
    weights = torch.rand(values.numel(), generator=gen)
    inverse = torch.stack([torch.randint(0, max(1, sum(s)), (batch,), generator=gen) for s in strides])
    theirs = tr.KeyedJaggedTensor(KEYS, values, weights, lengths=lengths, stride_per_key_per_rank=strides,
                                  inverse_indices=(KEYS, inverse))
    ours = as_keyed_jagged_tensor(theirs)
    assert ours.variable_stride_per_key() and ours.stride() == batch
    _check_kjt(ours, theirs)


def test_empty_torchrec_kjt():
    tr = _torchrec()
    for weighted in (False, True):
        theirs = tr.KeyedJaggedTensor.empty(is_weighted=weighted)
        ours = as_keyed_jagged_tensor(theirs)
        _check_kjt(ours, theirs)
        assert ours.to_dict() == {} and ours.stride() == 0


def _tables(weighted: bool = False):
    # torch's embedding_bag, which TorchRec's collection calls, weighs ids only when summing
    return [jr.EmbeddingBagConfig(name="t0", embedding_dim=3, num_embeddings=5, feature_names=["f0", "f2"]),
            jr.EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=5, feature_names=["f1"],
                                  pooling=jr.PoolingType.SUM if weighted else jr.PoolingType.MEAN)]


def _torchrec_ebc(ours: jr.EmbeddingBagCollection, weighted: bool):
    """TorchRec's EmbeddingBagCollection with ``ours``'s tables and rows."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    configs = [EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                                  feature_names=list(c.feature_names), pooling=PoolingType[c.pooling.name])
               for c in _tables(weighted)]
    theirs = EmbeddingBagCollection(configs, is_weighted=weighted)
    with torch.no_grad():
        for c in configs:
            theirs.embedding_bags[c.name].weight.copy_(ours.embedding_bags[c.name].weight)
    return theirs


@pytest.mark.parametrize("case", ["plain", "weighted", "offsets_only", "vbe"])
def test_converted_kjt_pools_as_torchrec_pools_its_own(case):
    """jaggedrec's collection on the converted KJT == TorchRec's on TorchRec's KJT."""
    tr = _torchrec()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    weighted = case in ("weighted", "vbe")
    if case == "vbe":
        strides = [[2], [3], [1]]
        lengths = torch.randint(0, 3, (6,), generator=gen)
        values = torch.randint(0, 5, (int(lengths.sum()),), generator=gen)
        inverse = torch.stack([torch.randint(0, s[0], (4,), generator=gen) for s in strides])
        theirs = tr.KeyedJaggedTensor(KEYS, values, torch.rand(values.numel(), generator=gen), lengths=lengths,
                                      stride_per_key_per_rank=strides, inverse_indices=(KEYS, inverse))
    else:
        values, lengths, weights = _batch(gen, 4, torch.int64, weighted)
        bags = dict(offsets=_offsets(lengths)) if case == "offsets_only" else dict(lengths=lengths)
        theirs = tr.KeyedJaggedTensor(KEYS, values, weights, **bags)
    ebc = jr.EmbeddingBagCollection(_tables(weighted), is_weighted=weighted, backend="torch")
    pooled = ebc(as_keyed_jagged_tensor(theirs))
    expected = _torchrec_ebc(ebc, weighted)(theirs)
    assert pooled.keys() == expected.keys() and pooled.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(pooled.values(), expected.values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_torchrec_jagged_tensor(dtype):
    tr = _torchrec()
    lengths = torch.tensor([2, 0, 1], dtype=dtype)
    values, weights = torch.tensor([4, 1, 3], dtype=dtype), torch.tensor([0.5, 1.5, 2.0])
    for given in (dict(lengths=lengths), dict(offsets=_offsets(lengths)),
                  dict(lengths=lengths, offsets=_offsets(lengths))):
        for w in (None, weights):
            theirs = tr.JaggedTensor(values, w, **given)
            ours = as_jagged_tensor(theirs)
            assert isinstance(ours, jr.JaggedTensor)
            for name in ("values", "weights_or_none", "lengths_or_none", "offsets_or_none"):
                _same(getattr(ours, name)(), getattr(theirs, name)())
            assert [t.tolist() for t in ours.to_dense()] == [t.tolist() for t in theirs.to_dense()]
            _equal(ours.to_padded_dense(), theirs.to_padded_dense())


def test_torchrec_keyed_tensor_from_their_pooling():
    """TorchRec's pooled output, taken as ours: same values tensor, same blocks, same regroup."""
    tr = _torchrec()
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(_tables(), backend="torch")
    values, lengths, _ = _batch(torch.Generator().manual_seed(2), 3, torch.int64, weighted=False)
    theirs = _torchrec_ebc(ebc, False)(tr.KeyedJaggedTensor(KEYS, values, lengths=lengths))
    ours = as_keyed_tensor(theirs)
    assert isinstance(ours, jr.KeyedTensor)
    _same(ours.values(), theirs.values())
    assert ours.keys() == theirs.keys() and ours.key_dim() == theirs.key_dim()
    assert ours.length_per_key() == theirs.length_per_key() and ours.offset_per_key() == theirs.offset_per_key()
    for key, block in ours.to_dict().items():
        _equal(block, theirs.to_dict()[key])
    groups = [["f1", "f0"], ["f2"]]
    for a, b in zip(jr.KeyedTensor.regroup([ours], groups), tr.KeyedTensor.regroup([theirs], groups)):
        _equal(a, b)


def test_jaggedrec_objects_pass_through_unchanged():
    kjt = jr.KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]))
    jt = jr.JaggedTensor(torch.tensor([1.0]), lengths=torch.tensor([1]))
    kt = jr.KeyedTensor(["a"], [2], torch.zeros(3, 2))
    assert as_keyed_jagged_tensor(kjt) is kjt and as_jagged_tensor(jt) is jt and as_keyed_tensor(kt) is kt


def test_anything_else_is_a_type_error_naming_it():
    kjt = jr.KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]))
    jt = kjt["a"]
    with pytest.raises(TypeError, match=r"as_keyed_jagged_tensor: got a dict; expected a KeyedJaggedTensor"):
        as_keyed_jagged_tensor({"a": jt})
    with pytest.raises(TypeError, match=r"as_jagged_tensor: got a torch\.Tensor; expected a JaggedTensor"):
        as_jagged_tensor(torch.zeros(2))
    with pytest.raises(TypeError, match=r"got a jaggedrec\.sparse\.jagged_tensor\.KeyedJaggedTensor; "
                                        r"expected a KeyedTensor"):
        as_keyed_tensor(kjt)
    with pytest.raises(TypeError, match=r"got a jaggedrec\.sparse\.jagged_tensor\.JaggedTensor; "
                                        r"expected a KeyedJaggedTensor"):
        as_keyed_jagged_tensor(jt)

    class KeyedJaggedTensor:  # the name alone is not enough
        def keys(self):
            return ["a"]

    with pytest.raises(TypeError, match=r"without the methods \['values', "):
        as_keyed_jagged_tensor(KeyedJaggedTensor())


def test_fx_tracing_passes_the_proxy_through():
    """A module that converts its input at entry stays traceable by torch.fx."""
    def forward(features):
        return as_keyed_jagged_tensor(features).values() * 2

    graph = torch.fx.symbolic_trace(forward)
    kjt = jr.KeyedJaggedTensor(["a"], torch.tensor([1, 2]), lengths=torch.tensor([2]))
    assert graph(kjt).tolist() == [2, 4]
    assert not any("as_keyed_jagged_tensor" in str(node.target) for node in graph.graph.nodes)
