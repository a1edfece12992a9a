"""The KeyedJaggedTensor methods that TorchRec's input all-to-all and train pipelines call:
``dist_labels``, ``dist_splits``, ``dist_tensors``, ``dist_init``, ``flatten_lengths``, ``copy_``,
``record_stream``, and ``split`` of a VBE KJT.

Each is checked against a reference built here from the per-key bags the test drew (the
all-to-all is simulated rank by rank, and its recat written out), and, where TorchRec is
installed, against TorchRec's own method on the same inputs (those tests skip without it).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import KeyedJaggedTensor

try:
    import torchrec
    import torchrec.sparse.jagged_tensor as tr
except ImportError:  # CI's second lane: the TorchRec comparisons skip, the rest still runs
    torchrec = tr = None

needs_torchrec = pytest.mark.skipif(tr is None, reason="torchrec is not installed")

# a key's bags: (values [N], lengths [B_k], weights [N] or None)
Bags = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def _draw_bags(gen: torch.Generator, keys: Sequence[str], bags_per_key: Dict[str, int], weighted: bool,
               dtype: torch.dtype, empty_keys: Sequence[str] = ()) -> Dict[str, Bags]:
    """Random bags per key: some empty in every key with bags, and ``empty_keys`` with no ids."""
    out = {}
    for key in keys:
        n_bags = bags_per_key[key]
        lengths = torch.randint(0, 4, (n_bags,), generator=gen)
        if key in empty_keys:
            lengths.zero_()
        elif n_bags > 1:
            lengths[int(torch.randint(0, n_bags, (1,), generator=gen))] = 0
        values = torch.randint(0, 20, (int(lengths.sum()),), generator=gen)  # 20 ids: duplicates
        weights = torch.rand(values.numel(), generator=gen, dtype=torch.float64).float() if weighted else None
        out[key] = (values.to(dtype), lengths.to(dtype), weights)
    return out


def _kjt_args(bags: Dict[str, Bags], vbe: bool, inverse: Optional[torch.Tensor] = None) -> dict:
    keys = list(bags)
    weighted = bags[keys[0]][2] is not None
    args = dict(keys=keys, values=torch.cat([bags[k][0] for k in keys]),
                weights=torch.cat([bags[k][2] for k in keys]) if weighted else None,
                lengths=torch.cat([bags[k][1] for k in keys]))
    if vbe:
        args["stride_per_key_per_rank"] = [[bags[k][1].numel()] for k in keys]
    if inverse is not None:
        args["inverse_indices"] = (keys, inverse)
    return args


def _assert_equal(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], what: str) -> None:
    assert (actual is None) == (expected is None), what
    if expected is not None:
        assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} != {expected.dtype}"
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=what)


def _assert_same_kjt(ours, theirs) -> None:
    """Tensors, batch sizes and host metadata of two KJTs (ours and TorchRec's, or a reference)."""
    assert ours.keys() == theirs.keys()
    for name in ("values", "lengths", "weights_or_none"):
        _assert_equal(getattr(ours, name)(), getattr(theirs, name)(), name)
    assert ours.variable_stride_per_key() == theirs.variable_stride_per_key()
    assert ours.stride() == theirs.stride() and ours.stride_per_key() == theirs.stride_per_key()
    assert ours.stride_per_key_per_rank() == theirs.stride_per_key_per_rank()
    assert ours.length_per_key() == theirs.length_per_key()


# --- flatten_lengths ------------------------------------------------------------------------

def _flatten_cases():
    gen = torch.Generator().manual_seed(11)
    keys = ["a", "b", "c"]
    for dtype, weighted, vbe in ((torch.int64, True, False), (torch.int32, False, False),
                                 (torch.int32, True, True), (torch.int64, False, True)):
        per_key = {k: (2 + i if vbe else 4) for i, k in enumerate(keys)}
        bags = _draw_bags(gen, keys, per_key, weighted, dtype, empty_keys=("b",))
        # VBE: a batch of 6 samples (wider than any key's bags), so stride() is the inverse's width
        inverse = torch.randint(0, 2, (3, 6), generator=gen) if vbe else None
        yield bags, vbe, inverse


@pytest.mark.parametrize("case", range(4))
def test_flatten_lengths_keeps_tensors_and_drops_inverse_indices(case):
    bags, vbe, inverse = list(_flatten_cases())[case]
    kjt = KeyedJaggedTensor(**_kjt_args(bags, vbe, inverse))
    kjt.offsets()  # cached offsets are not carried over
    flat = kjt.flatten_lengths()
    keys = list(bags)
    _assert_equal(flat.values(), torch.cat([bags[k][0] for k in keys]), "values")
    _assert_equal(flat.lengths(), torch.cat([bags[k][1] for k in keys]), "lengths")
    assert flat.lengths().dim() == 1 and flat.offsets_or_none() is None and flat.inverse_indices_or_none() is None
    assert flat.weights_or_none() is kjt.weights_or_none() and flat.values() is kjt.values()
    assert flat.length_per_key() == [bags[k][0].numel() for k in keys]
    assert flat.stride() == (6 if vbe else 4)
    assert flat.stride_per_key() == [bags[k][1].numel() for k in keys]
    assert flat.variable_stride_per_key() == vbe


@needs_torchrec
@pytest.mark.parametrize("case", range(4))
def test_flatten_lengths_matches_torchrec(case):
    bags, vbe, inverse = list(_flatten_cases())[case]
    args = _kjt_args(bags, vbe, inverse)
    theirs = tr.KeyedJaggedTensor(**args)
    # TorchRec's keeps the batch size only once stride() has been asked (else its result falls
    # back to the largest B_k); ours always keeps it
    theirs.stride()
    ours, theirs = KeyedJaggedTensor(**args).flatten_lengths(), theirs.flatten_lengths()
    _assert_same_kjt(ours, theirs)
    assert ours.inverse_indices_or_none() is None and theirs.inverse_indices_or_none() is None


# --- what a rank sends: dist_labels, dist_splits, dist_tensors -------------------------------

def _rank_bags(gen, keys, weighted, dtype, vbe, batch) -> Dict[str, Bags]:
    per_key = {k: int(torch.randint(0, 4, (1,), generator=gen)) if vbe else batch for k in keys}
    if vbe:
        per_key[keys[1]] = 0  # a key with no bags on this rank
    return _draw_bags(gen, keys, per_key, weighted, dtype, empty_keys=(keys[-1],))


@pytest.mark.parametrize("vbe", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_dist_labels_splits_and_tensors(vbe, weighted):
    gen = torch.Generator().manual_seed(5 + 2 * vbe + weighted)
    keys = ["a", "b", "c", "d", "e"]
    bags = _rank_bags(gen, keys, weighted, torch.int32, vbe, batch=3)
    kjt = KeyedJaggedTensor(**_kjt_args(bags, vbe))
    expected_labels = ["lengths", "values"] + (["strides"] if vbe else []) + (["weights"] if weighted else [])
    assert kjt.dist_labels() == expected_labels
    key_splits = [2, 0, 3]  # keys a, b to rank 0; none to rank 1; c, d, e to rank 2
    groups = [keys[:2], [], keys[2:]]
    bag_counts = [sum(bags[k][1].numel() for k in g) for g in groups]
    id_counts = [sum(bags[k][0].numel() for k in g) for g in groups]
    expected = [bag_counts, id_counts] + ([key_splits] if vbe else []) + ([id_counts] if weighted else [])
    assert kjt.dist_splits(key_splits) == expected
    tensors = kjt.dist_tensors()
    assert len(tensors) == len(expected_labels)
    _assert_equal(tensors[0], torch.cat([bags[k][1] for k in keys]), "lengths")
    _assert_equal(tensors[1], torch.cat([bags[k][0] for k in keys]), "values")
    if vbe:
        _assert_equal(tensors[2], torch.tensor([bags[k][1].numel() for k in keys]), "strides")
    if weighted:
        _assert_equal(tensors[-1], torch.cat([bags[k][2] for k in keys]), "weights")
    for bad in ([2, 2], [3, -1, 3], [6]):
        with pytest.raises(ValueError, match="key_splits"):
            kjt.dist_splits(bad)


@needs_torchrec
@pytest.mark.parametrize("vbe", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_dist_labels_splits_and_tensors_match_torchrec(vbe, weighted):
    gen = torch.Generator().manual_seed(15 + 2 * vbe + weighted)
    keys = ["a", "b", "c", "d"]
    args = _kjt_args(_rank_bags(gen, keys, weighted, torch.int64, vbe, batch=4), vbe)
    ours, theirs = KeyedJaggedTensor(**args), tr.KeyedJaggedTensor(**args)
    assert ours.dist_labels() == theirs.dist_labels()
    for key_splits in ([1, 3], [0, 4], [2, 0, 1, 1]):
        assert ours.dist_splits(key_splits) == theirs.dist_splits(key_splits)
    for i, (a, b) in enumerate(zip(ours.dist_tensors(), theirs.dist_tensors(), strict=True)):
        _assert_equal(a, b, f"dist_tensors()[{i}]")


# --- the all-to-all, simulated: dist_init on what each rank receives --------------------------

def _rank_order(world: int, stagger: int) -> List[int]:
    """The order in which the recat lays out the ranks' blocks of a key: with ``stagger`` groups
    of ``world // stagger`` ranks, the first rank of each group, then the second of each, ..."""
    per_group = world // stagger
    return [g + per_group * s for g in range(per_group) for s in range(stagger)]


def _recat(local_split: int, world: int, stagger: int, batch_per_rank: Optional[List[int]]) -> Optional[torch.Tensor]:
    """Received blocks come rank-major (rank r's keys 0..local_split-1, then rank r+1's); the
    recat lists them key-major. When ranks' batches differ, it lists single bags instead."""
    if local_split == 0:
        return None
    blocks = [k + r * local_split for k in range(local_split) for r in _rank_order(world, stagger)]
    if batch_per_rank is None or len(set(batch_per_rank)) <= 1:
        return torch.tensor(blocks, dtype=torch.int32)
    first_bag = [0]
    for block in range(world * local_split):
        first_bag.append(first_bag[-1] + batch_per_rank[block // local_split])
    return torch.tensor([first_bag[b] + i for b in blocks for i in range(batch_per_rank[b // local_split])],
                        dtype=torch.int32)


def _all_to_all(senders: List[KeyedJaggedTensor], key_splits: List[int]) -> List[List[torch.Tensor]]:
    """What each rank receives: for every dist tensor, block ``j`` of each sender, in rank order."""
    world = len(senders)
    sent = [[torch.split(t, s) for t, s in zip(kjt.dist_tensors(), kjt.dist_splits(key_splits), strict=True)]
            for kjt in senders]
    return [[torch.cat([sent[r][i][j] for r in range(world)]) for i in range(len(sent[0]))] for j in range(world)]


def _dist_case(seed: int, world: int, vbe: bool, weighted: bool, dtype: torch.dtype, batches: Sequence[int]):
    gen = torch.Generator().manual_seed(seed)
    keys = ["a", "b", "c", "d", "e"]
    ranks = [_rank_bags(gen, keys, weighted, dtype, vbe, batches[r]) for r in range(world)]
    return keys, ranks


def _expected_kjt(keys: Sequence[str], ranks: List[Dict[str, Bags]], order: List[int], vbe: bool) -> KeyedJaggedTensor:
    """Each key's bags from every rank, in ``order``, as one KJT, built from the drawn bags."""
    some = ranks[0]["a"]  # for the dtypes of a KJT of no keys
    cat = lambda key, i: torch.cat([ranks[r][key][i] for r in order])  # noqa: E731
    values = torch.cat([some[0][:0]] + [cat(k, 0) for k in keys])
    lengths = torch.cat([some[1][:0]] + [cat(k, 1) for k in keys])
    weights = None if some[2] is None else torch.cat([some[2][:0]] + [cat(k, 2) for k in keys])
    if vbe:
        spkpr = [[ranks[r][k][1].numel() for r in order] for k in keys]
        return KeyedJaggedTensor(list(keys), values, weights, lengths=lengths, stride_per_key_per_rank=spkpr)
    return KeyedJaggedTensor(list(keys), values, weights, lengths=lengths,
                             stride=sum(ranks[r]["a"][1].numel() for r in order))


DIST_CASES = [  # world, stagger, vbe, weighted, ids dtype, each rank's batch (not VBE)
    (1, 1, False, True, torch.int64, [3]),
    (3, 1, False, False, torch.int32, [2, 2, 2]),
    (3, 1, False, True, torch.int64, [2, 0, 3]),  # ranks of different batches, one empty
    (3, 1, True, False, torch.int64, None),
    (3, 1, True, True, torch.int32, None),
    (4, 2, True, True, torch.int64, None),  # staggered ranks (TWRW)
    (4, 2, False, False, torch.int64, [2, 2, 2, 2]),
]
KEY_SPLITS = {1: [5], 3: [2, 0, 3], 4: [1, 2, 0, 2]}


@pytest.mark.parametrize("case", range(len(DIST_CASES)))
def test_dist_init_round_trip_gathers_each_key_over_ranks(case):
    world, stagger, vbe, weighted, dtype, batches = DIST_CASES[case]
    keys, ranks = _dist_case(30 + case, world, vbe, weighted, dtype, batches or [0] * world)
    senders = [KeyedJaggedTensor(**_kjt_args(r, vbe)) for r in ranks]
    key_splits = KEY_SPLITS[world]
    stride_per_rank = None if vbe else list(batches)
    for dest, received in enumerate(_all_to_all(senders, key_splits)):
        first = sum(key_splits[:dest])
        local_keys = keys[first:first + key_splits[dest]]
        recat = _recat(len(local_keys), world, stagger, stride_per_rank)
        got = KeyedJaggedTensor.dist_init(local_keys, received, vbe, world, recat, stride_per_rank, stagger)
        expected = _expected_kjt(local_keys, ranks, _rank_order(world, stagger), vbe)
        _assert_same_kjt(got, expected)
        assert got.length_per_key_or_none() is not None  # synced, as the pipeline expects
        if local_keys:
            for key in local_keys:
                _assert_equal(got[key].lengths(), expected[key].lengths(), key)


def test_dist_init_rejects_malformed_input():
    lengths, values = torch.tensor([1, 0, 2, 1]), torch.tensor([4, 5, 6, 7])
    with pytest.raises(ValueError, match="tensors"):
        KeyedJaggedTensor.dist_init(["a"], [lengths], False, 2, None, [2, 2])
    with pytest.raises(ValueError, match="strides"):
        KeyedJaggedTensor.dist_init(["a"], [lengths, values], True, 2, None, None)
    with pytest.raises(ValueError, match="stride_per_rank"):
        KeyedJaggedTensor.dist_init(["a"], [lengths, values], False, 2, None, None)
    with pytest.raises(ValueError, match="3 strides for 2 ranks"):
        KeyedJaggedTensor.dist_init(["a"], [lengths, values, torch.tensor([1, 1, 2])], True, 2, None, None)
    with pytest.raises(ValueError, match="recat"):
        KeyedJaggedTensor.dist_init(["a", "b"], [lengths, values], False, 2, torch.tensor([0, 1, 2]), [1, 1])


@needs_torchrec
@pytest.mark.parametrize("case", range(len(DIST_CASES)))
def test_dist_init_matches_torchrec(case):
    from torchrec.distributed.dist_data import _get_recat
    world, stagger, vbe, weighted, dtype, batches = DIST_CASES[case]
    keys, ranks = _dist_case(60 + case, world, vbe, weighted, dtype, batches or [0] * world)
    senders = [KeyedJaggedTensor(**_kjt_args(r, vbe)) for r in ranks]
    key_splits = KEY_SPLITS[world]
    stride_per_rank = None if vbe else list(batches)
    for dest, received in enumerate(_all_to_all(senders, key_splits)):
        first = sum(key_splits[:dest])
        local_keys = keys[first:first + key_splits[dest]]
        recat = _get_recat(len(local_keys), world, stagger, torch.device("cpu"), stride_per_rank)
        ours_recat = _recat(len(local_keys), world, stagger, stride_per_rank)
        assert (recat is None) == (ours_recat is None)
        if recat is not None:  # the test's recat is TorchRec's
            assert recat.tolist() == ours_recat.tolist()
        ours = KeyedJaggedTensor.dist_init(local_keys, [t.clone() for t in received], vbe, world, recat,
                                           stride_per_rank, stagger)
        theirs = tr.KeyedJaggedTensor.dist_init(local_keys, [t.clone() for t in received], vbe, world, recat,
                                                stride_per_rank, stagger)
        _assert_same_kjt(ours, theirs)


# --- split of a VBE KJT, and the part in the collection ---------------------------------------

def _vbe_tables(pooling: jr.PoolingType = jr.PoolingType.MEAN) -> List[jr.EmbeddingBagConfig]:
    return [jr.EmbeddingBagConfig(name="t_user", embedding_dim=3, num_embeddings=20, feature_names=["user"]),
            jr.EmbeddingBagConfig(name="t_item", embedding_dim=5, num_embeddings=20, feature_names=["item", "none"],
                                  pooling=pooling)]


def _vbe_batch(seed: int, weighted: bool, dtype: torch.dtype, batch: int = 5):
    """Keys in a shuffled order; "user" has 2 bags shared by the batch, "none" no ids."""
    gen = torch.Generator().manual_seed(seed)
    keys = ["item", "none", "user"]
    per_key = {"user": 2, "item": batch, "none": 3}
    bags = _draw_bags(gen, keys, per_key, weighted, dtype, empty_keys=("none",))
    inverse = torch.stack([torch.randperm(batch, generator=gen) % per_key[k] for k in keys])
    return bags, inverse


def _reference_pooled(configs, bags: Dict[str, Bags], inverse: torch.Tensor, tables64) -> torch.Tensor:
    """``[B, total_dim]`` float64: each sample's bag of each feature (by the inverse indices),
    pooled with F.embedding_bag over a float64 table, feature by feature."""
    keys = list(bags)
    out = []
    for config, table in zip(configs, tables64, strict=True):
        for feature in config.feature_names:
            values, lengths, weights = bags[feature]
            starts = F.pad(lengths.long().cumsum(0), (1, 0))
            rows = inverse[keys.index(feature)].tolist()
            take = [torch.arange(int(starts[b]), int(starts[b + 1])) for b in rows]
            take = torch.cat(take) if take else torch.empty(0, dtype=torch.long)
            expanded = lengths.long()[rows]
            psw = None if weights is None else weights.double()[take]
            pooled = F.embedding_bag(values.long()[take], table, F.pad(expanded.cumsum(0), (1, 0)), mode="sum",
                                     per_sample_weights=psw, include_last_offset=True)
            if config.pooling == jr.PoolingType.MEAN:
                pooled = pooled / expanded.clamp(min=1).double().unsqueeze(1)
            out.append(pooled)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("weighted,dtype", [(False, torch.int64), (True, torch.int32)])
def test_vbe_split_of_every_key_is_the_kjt_and_pools_in_the_collection(weighted, dtype):
    bags, inverse = _vbe_batch(7 + weighted, weighted, dtype)
    kjt = KeyedJaggedTensor(**_kjt_args(bags, vbe=True, inverse=inverse))
    (whole,) = kjt.split([3])
    assert whole is kjt and whole.inverse_indices()[1] is inverse
    empty, again = kjt.split([0, 3])
    assert again is kjt and empty.keys() == [] and empty.values().numel() == 0 and empty.lengths().numel() == 0
    assert empty.variable_stride_per_key() and empty.inverse_indices_or_none() is None
    configs = _vbe_tables()
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted)
    tables64 = [ebc.embedding_bags[c.name].weight.detach().double() for c in configs]
    out = ebc(whole)
    assert out.keys() == ["user", "item", "none"] and out.values().shape == (5, 13)
    torch.testing.assert_close(out.values().double(), _reference_pooled(configs, bags, inverse, tables64),
                               rtol=1e-5, atol=1e-5)
    # parts of fewer keys have no inverse indices (as TorchRec's): the collection refuses them
    user_part, rest = kjt.split([2, 1])
    assert user_part.inverse_indices_or_none() is None and rest.inverse_indices_or_none() is None
    assert rest.keys() == ["user"] and rest.stride_per_key_per_rank() == [[2]]
    with pytest.raises(ValueError, match="inverse_indices"):
        jr.EmbeddingBagCollection(configs[:1], is_weighted=weighted)(rest)


@needs_torchrec
@pytest.mark.parametrize("weighted,dtype", [(False, torch.int32), (True, torch.int64)])
def test_vbe_split_and_collection_match_torchrec(weighted, dtype):
    bags, inverse = _vbe_batch(17 + weighted, weighted, dtype)
    args = _kjt_args(bags, vbe=True, inverse=inverse)
    ours, theirs = KeyedJaggedTensor(**args), tr.KeyedJaggedTensor(**args)
    for segments in ([3], [0, 3], [3, 0], [1, 2], [2, 0, 1]):
        ours_parts, their_parts = ours.split(segments), theirs.split(segments)
        assert len(ours_parts) == len(their_parts)
        for a, b in zip(ours_parts, their_parts, strict=True):
            assert (a is ours) == (b is theirs)
            assert a.keys() == b.keys() and a.stride() == b.stride()
            assert (a.inverse_indices_or_none() is None) == (b.inverse_indices_or_none() is None)
            assert a.stride_per_key_per_rank() == b.stride_per_key_per_rank()
            assert a.values().tolist() == b.values().tolist() and a.lengths().tolist() == b.lengths().tolist()
    # nn.EmbeddingBag, which TorchRec's collection pools with, has no MEAN with per-id weights
    configs = _vbe_tables(jr.PoolingType.SUM if weighted else jr.PoolingType.MEAN)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted)
    tr_tables = [torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim,
                                             num_embeddings=c.num_embeddings, feature_names=c.feature_names,
                                             pooling=torchrec.PoolingType[c.pooling.name]) for c in configs]
    tr_ebc = torchrec.EmbeddingBagCollection(tables=tr_tables, is_weighted=weighted)
    with torch.no_grad():
        for c in configs:
            tr_ebc.embedding_bags[c.name].weight.copy_(ebc.embedding_bags[c.name].weight)
    expected = tr_ebc(theirs.split([3])[0])
    got = ebc(ours.split([3])[0])
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got.values(), expected.values(), rtol=1e-5, atol=1e-5)


# --- copy_ and record_stream ---------------------------------------------------------------

def _copy_case(seed: int, vbe: bool, weighted: bool, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    keys = ["a", "b", "c"]
    bags = _draw_bags(gen, keys, {"a": 4, "b": 2 if vbe else 4, "c": 3 if vbe else 4}, weighted, dtype,
                      empty_keys=("b",))
    inverse = torch.randint(0, 2, (3, 4), generator=gen) if vbe else None
    return bags, _kjt_args(bags, vbe, inverse)


@pytest.mark.parametrize("vbe,weighted,dtype", [(False, False, torch.int32), (False, True, torch.int64),
                                                (True, True, torch.int32), (True, False, torch.int64)])
def test_copy_fills_a_buffer_in_place(vbe, weighted, dtype):
    bags, args = _copy_case(40 + 2 * vbe + weighted, vbe, weighted, dtype)
    shaped = KeyedJaggedTensor(**args)
    shaped.offsets()  # a buffer that holds offsets too, filled from a source that has only lengths
    buffer = KeyedJaggedTensor.empty_like(shaped, device=torch.device("cpu"))
    held = lambda: [buffer.values(), buffer.lengths(), buffer.offsets_or_none(), buffer.weights_or_none()]  # noqa: E731
    before = held()
    source = KeyedJaggedTensor(**args)
    assert buffer.copy_(source) is buffer
    assert all(a is b for a, b in zip(held(), before, strict=True))  # filled in place
    keys = list(bags)
    _assert_equal(buffer.values(), torch.cat([bags[k][0] for k in keys]), "values")
    lengths = torch.cat([bags[k][1] for k in keys])
    _assert_equal(buffer.lengths(), lengths, "lengths")
    _assert_equal(buffer.offsets(), F.pad(lengths.cumsum(0), (1, 0)).to(dtype), "offsets")
    _assert_equal(buffer.weights_or_none(), args["weights"], "weights")
    assert buffer.length_per_key() == [bags[k][0].numel() for k in keys]
    assert buffer.stride_per_key() == [bags[k][1].numel() for k in keys]
    assert buffer.stride() == 4
    if vbe:
        assert buffer.inverse_indices()[1] is not args["inverse_indices"][1]
        _assert_equal(buffer.inverse_indices()[1], args["inverse_indices"][1], "inverse_indices")
    else:
        assert buffer.inverse_indices_or_none() is None


def test_copy_refuses_a_buffer_of_another_shape_and_leaves_it_whole():
    _, args = _copy_case(50, vbe=False, weighted=True, dtype=torch.int64)
    source = KeyedJaggedTensor(**args)
    buffer = KeyedJaggedTensor.empty_like(source, device=torch.device("cpu"))
    buffer.values().fill_(-1)
    unweighted = KeyedJaggedTensor(**{**args, "weights": None})
    with pytest.raises(ValueError, match="weights"):
        buffer.copy_(unweighted)
    longer = KeyedJaggedTensor(**{**args, "values": torch.cat([args["values"], args["values"][:1]]),
                                  "weights": torch.cat([args["weights"], args["weights"][:1]])})
    with pytest.raises(ValueError, match="values of shape"):
        buffer.copy_(longer)  # a one-id-longer source would otherwise be refused or broadcast by torch
    with pytest.raises(ValueError, match="keys"):
        buffer.copy_(KeyedJaggedTensor(**{**args, "keys": ["a", "c", "b"]}))
    assert buffer.values().eq(-1).all()


@needs_torchrec
@pytest.mark.parametrize("vbe,weighted", [(False, True), (True, False), (True, True)])
def test_copy_matches_torchrec(vbe, weighted):
    _, args = _copy_case(70 + 2 * vbe + weighted, vbe, weighted, torch.int64)
    cpu = torch.device("cpu")
    ours = KeyedJaggedTensor.empty_like(KeyedJaggedTensor(**args), device=cpu)
    theirs = tr.KeyedJaggedTensor.empty_like(tr.KeyedJaggedTensor(**args), device=cpu)
    ours.copy_(KeyedJaggedTensor(**args))
    theirs.copy_(tr.KeyedJaggedTensor(**args))
    _assert_same_kjt(ours, theirs)
    assert (ours.inverse_indices_or_none() is None) == (theirs.inverse_indices_or_none() is None)
    if vbe:
        _assert_equal(ours.inverse_indices()[1], theirs.inverse_indices()[1], "inverse_indices")


def _recorded_calls(monkeypatch) -> List[torch.device]:
    calls = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: calls.append(t.device))
    return calls


def test_record_stream_is_a_no_op_on_host_tensors(monkeypatch):
    _, args = _copy_case(80, vbe=True, weighted=True, dtype=torch.int64)
    kjt = KeyedJaggedTensor(**args)
    kjt.offsets()
    calls = _recorded_calls(monkeypatch)
    assert kjt.record_stream(torch.Stream(device="cpu")) is None
    assert calls == []
    kjt.values().tolist()  # the tensors are untouched and readable


def test_record_stream_marks_every_device_tensor(monkeypatch):
    meta = torch.device("meta")
    kjt = KeyedJaggedTensor(["a", "b"], torch.empty(5, dtype=torch.int64, device=meta), torch.empty(5, device=meta),
                            lengths=torch.empty(3, dtype=torch.int64, device=meta),
                            offsets=torch.empty(4, dtype=torch.int64, device=meta), stride_per_key_per_rank=[[1], [2]],
                            inverse_indices=(["a", "b"], torch.empty(2, 2, dtype=torch.int64, device=meta)))
    calls = _recorded_calls(monkeypatch)
    kjt.record_stream(torch.Stream(device="cpu"))
    assert calls == [meta] * 5  # values, weights, lengths, offsets, inverse indices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_record_stream_on_cuda_keeps_tensors_for_the_side_stream():
    _, args = _copy_case(90, vbe=True, weighted=True, dtype=torch.int64)
    kjt = KeyedJaggedTensor(**args).to(torch.device("cuda"))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        kjt.record_stream(side)
        total = kjt.values().sum()
    torch.cuda.synchronize()
    assert int(total) == int(args["values"].sum())


# --- the public methods the embedding modules call: offsets for the lookup, and what is known ------

def _lengths_and_offsets(agree: bool):
    lengths = torch.tensor([2, 0, 1, 1], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 2, 3, 4] if agree else [0, 1, 2, 3, 4], dtype=torch.int32)
    return KeyedJaggedTensor(["a", "b"], torch.arange(4), lengths=lengths, offsets=offsets)


def test_lookup_offsets_come_from_the_lengths_until_given_offsets_are_checked():
    """Offsets given beside lengths are unchecked: the lookup reads the lengths' offsets
    (uncached, the given ones left as they are) until validation marks them as agreeing."""
    disagree = _lengths_and_offsets(agree=False)
    assert disagree.has_unchecked_offsets()
    assert disagree.lookup_offsets().tolist() == [0, 2, 2, 3, 4]
    assert disagree.offsets().tolist() == [0, 1, 2, 3, 4]  # still the caller's
    agree = _lengths_and_offsets(agree=True)
    given = agree.offsets()
    agree.mark_offsets_checked()
    assert not agree.has_unchecked_offsets() and agree.lookup_offsets() is given
    # the check is kept by a move to another device (here the same one), not invented by it
    assert not agree.to(torch.device("cpu")).has_unchecked_offsets()
    assert disagree.to(torch.device("cpu")).has_unchecked_offsets()


def test_derived_offsets_are_never_unchecked():
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(4), lengths=torch.tensor([2, 0, 1, 1]))
    assert not kjt.has_unchecked_offsets()
    derived = kjt.offsets()
    assert not kjt.has_unchecked_offsets() and kjt.lookup_offsets() is derived
    only_offsets = KeyedJaggedTensor(["a", "b"], torch.arange(4), offsets=torch.tensor([0, 2, 2, 3, 4]))
    assert not only_offsets.has_unchecked_offsets() and only_offsets.lookup_offsets().tolist() == [0, 2, 2, 3, 4]


def test_collection_pools_with_the_lengths_when_given_offsets_disagree():
    """validate=False: no check, and the lengths decide; validate=True: the disagreement is named."""
    kjt = _lengths_and_offsets(agree=False)
    config = jr.EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4, feature_names=["a", "b"])
    ebc = jr.EmbeddingBagCollection([config], validate=False, backend="torch")
    rows = ebc.embedding_bags["t"].weight.detach()
    pooled = ebc(kjt).values()
    # a: [0, 1], []; b: [2], [3] (the given offsets would make a: [0], [1])
    expected = torch.stack([torch.cat([rows[0] + rows[1], rows[2]]), torch.cat([rows.new_zeros(2), rows[3]])])
    torch.testing.assert_close(pooled, expected)
    with pytest.raises(ValueError, match="disagree"):
        jr.EmbeddingBagCollection([config], backend="torch")(_lengths_and_offsets(agree=False))


def test_or_none_accessors_report_only_what_is_known():
    vbe = KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 0, 2]),
                            stride_per_key_per_rank=torch.tensor([[1], [2]]))
    assert vbe.stride_or_none() is None and vbe.stride_per_key_or_none() is None
    assert vbe.lengths_offset_per_key_or_none() is None and vbe.index_per_key_or_none() is None
    assert vbe.stride_per_key_per_rank_tensor().tolist() == [[1], [2]]
    assert vbe.stride() == 2 and vbe.stride_or_none() == 2
    assert vbe.stride_per_key_or_none() == [1, 2] and vbe.lengths_offset_per_key_or_none() is None
    assert vbe["b"].values().tolist() == [1, 2] and vbe.index_per_key_or_none() == {"a": 0, "b": 1}
    assert vbe.lengths_offset_per_key_or_none() == [0, 1, 3]
    plain = KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 0, 2, 0]))
    assert plain.stride_or_none() == 2 and plain.stride_per_key_per_rank_tensor() is None
    as_list = KeyedJaggedTensor(["a"], torch.arange(1), lengths=torch.tensor([1]), stride_per_key_per_rank=[[1]])
    held = as_list.stride_per_key_per_rank_tensor()
    assert held.dtype == torch.int32 and held.tolist() == [[1]]
