"""The data checks' CPU fast path (``validation._host_batch_ok``: fewer torch calls for a
batch that passes) keeps every check: each bad batch, in each layout the KJT can arrive in
(lengths only, offsets only, both) and with int32 and int64 lengths and offsets, still raises
the error naming the feature, and good ones pool as a float64 loop of nn.EmbeddingBag does.
Ids past the smallest table but inside their own (tables of different sizes) are checked key
by key, and the per-key counts a KJT carries are then checked too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr

from jr_testing import assert_close

CONFIGS = [jr.EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10, feature_names=["user"]),
           jr.EmbeddingBagConfig(name="t_item", embedding_dim=3, num_embeddings=7, feature_names=["item"])]
LAYOUTS = ("lengths", "offsets", "both")
DTYPES = (torch.int32, torch.int64)

# ids of two samples per key, user then item: [[1, 8], []] and [[2], [3, 6, 6]] (an empty bag, duplicates)
GOOD_VALUES = [1, 8, 2, 3, 6, 6]
GOOD_LENGTHS = [2, 0, 1, 3]


def _kjt(values, lengths, layout, dtype, offsets=None):
    lengths = torch.tensor(lengths, dtype=dtype)
    if offsets is None:
        offsets = F.pad(lengths.cumsum(0), (1, 0))
    offsets = torch.tensor(offsets, dtype=dtype) if isinstance(offsets, list) else offsets.to(dtype)
    return jr.KeyedJaggedTensor(["user", "item"], torch.tensor(values, dtype=dtype),
                                lengths=None if layout == "offsets" else lengths,
                                offsets=None if layout == "lengths" else offsets)


def _reference(ebc, values, lengths):
    outs, start = [], 0
    for k, config in enumerate(CONFIGS):
        bag_lengths = torch.tensor(lengths[2 * k:2 * k + 2])
        n = int(bag_lengths.sum())
        table = ebc.embedding_bags[config.name].weight.detach().double()
        outs.append(F.embedding_bag(torch.tensor(values[start:start + n]), table, F.pad(bag_lengths.cumsum(0), (1, 0)),
                                    mode="sum", include_last_offset=True))
        start += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_good_batches_pool_as_the_loop(layout, dtype):
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(CONFIGS)
    out = ebc(_kjt(GOOD_VALUES, GOOD_LENGTHS, layout, dtype)).values()
    assert_close(out, _reference(ebc, GOOD_VALUES, GOOD_LENGTHS), what=f"{layout} {dtype}")


BAD = {  # name: (values, lengths, offsets or None, the layouts it can arrive in, the error)
    "negative length": ([1, 8, 2, 3, 6, 6], [2, 1, -1, 4], None, LAYOUTS,
                        r"feature 'item'.*sample 0 has negative length -1"),
    "lengths past the ids": ([1, 8, 2, 3, 6], GOOD_LENGTHS, None, ("lengths",), r"add up to 6 but values has 5"),
    "offsets past the ids": ([1, 8, 2, 3, 6], GOOD_LENGTHS, [0, 2, 2, 3, 6], ("offsets",),
                             r"add up to 6 but values has 5"),
    "offsets from 1": (GOOD_VALUES, [1, 1, 1, 3], [1, 2, 3, 4, 6], ("offsets",), r"offsets must start at 0, got 1"),
    "disagreeing": (GOOD_VALUES, GOOD_LENGTHS, [0, 1, 3, 3, 6], ("both",),
                    r"feature 'user'.*lengths and offsets disagree: sample 0 has length 2"),
    "id past its table": ([1, 8, 2, 3, 7, 6], GOOD_LENGTHS, None, LAYOUTS,
                          r"feature 'item'.*id 7 in sample 1 is out of range \[0, 7\)"),
    "negative id": ([1, -8, 2, 3, 6, 6], GOOD_LENGTHS, None, LAYOUTS,
                    r"feature 'user'.*id -8 in sample 0 is out of range \[0, 10\)"),
    "id past the largest table": ([1, 10, 2, 3, 6, 6], GOOD_LENGTHS, None, LAYOUTS,
                                  r"feature 'user'.*id 10 in sample 0 is out of range \[0, 10\)"),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_batches_raise_naming_the_feature(name, dtype):
    values, lengths, offsets, layouts, error = BAD[name]
    for layout in layouts:
        with pytest.raises(ValueError, match=error):
            jr.EmbeddingBagCollection(CONFIGS)(_kjt(values, lengths, layout, dtype, offsets))


def test_int32_lengths_that_wrap_still_fail():
    """int32 offsets can wrap past 2**31 and come back to the id count, each step equal to its
    length: the lengths are then summed in int64, which sees that they do not add up."""
    lengths = torch.tensor([2**31 - 1, 2**31 - 1, 2], dtype=torch.int32)
    offsets = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # [0, 2**31 - 1, -2, 0]
    assert offsets[-1] == 0
    ebc = jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3,
                                                           feature_names=["f"])])
    for given in ({"lengths": lengths, "offsets": offsets}, {"offsets": offsets}):
        with pytest.raises(ValueError):
            ebc(jr.KeyedJaggedTensor(["f"], torch.zeros(0, dtype=torch.int32), **given))


def test_carried_counts_checked_when_ids_pass_the_smallest_table():
    """Ids 8 and 9 are past the item table (7 rows) but inside the user table (10): checked key by
    key they pass, and the KJT's length_per_key must still agree with its lengths (it was not
    compared when an id went past the smallest table)."""
    values, lengths = torch.tensor([8, 9, 1, 3, 5]), torch.tensor([2, 1, 0, 2])  # user: 3 ids, item: 2
    ebc = jr.EmbeddingBagCollection(CONFIGS)
    wrong = jr.KeyedJaggedTensor(["user", "item"], values, lengths=lengths, length_per_key=[2, 3])
    with pytest.raises(ValueError, match=r"feature 'user'.*length_per_key says 2 ids, its lengths add up to 3"):
        ebc(wrong)
    right = jr.KeyedJaggedTensor(["user", "item"], values, lengths=lengths, length_per_key=[3, 2])
    assert_close(ebc(right).values(), _reference(ebc, values.tolist(), lengths.tolist()), what="right counts")
