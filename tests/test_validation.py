"""Bad input raises a clear error that names the feature; it never gives a wrong answer."""

import pytest
import torch

import jaggedrec as jr

CONFIGS = [
    jr.EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10, feature_names=["user"]),
    jr.EmbeddingBagConfig(name="t_item", embedding_dim=3, num_embeddings=7, feature_names=["item"]),
]


def _ebc(**kwargs):
    return jr.EmbeddingBagCollection(CONFIGS, **kwargs)


def _kjt(values, lengths=None, offsets=None, keys=("user", "item"), weights=None):
    return jr.KeyedJaggedTensor(list(keys), torch.tensor(values), weights, lengths=lengths, offsets=offsets)


def test_missing_feature():
    with pytest.raises(ValueError, match=r"\['item'\].*missing"):
        _ebc()(_kjt([1, 2], lengths=torch.tensor([1, 1]), keys=["user"]))


def test_lengths_do_not_match_values():
    with pytest.raises(ValueError, match="add up to 3 but values has 4"):
        _ebc()(_kjt([1, 2, 3, 4], lengths=torch.tensor([1, 1, 1, 0])))


def test_negative_length_names_feature_and_sample():
    with pytest.raises(ValueError, match=r"feature 'item'.*sample 1 has negative length -1"):
        _ebc()(_kjt([1, 2], lengths=torch.tensor([1, 1, 2, -1])))


def test_decreasing_offsets():
    with pytest.raises(ValueError, match="feature 'user'.*negative length"):
        _ebc()(_kjt([1, 2, 3], offsets=torch.tensor([0, 2, 1, 2, 3])))


def test_non_integer_ids():
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        _ebc()(jr.KeyedJaggedTensor(["user", "item"], torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 0, 1, 0])))


@pytest.mark.parametrize("bad_id, where", [(7, "item"), (-1, "item"), (10, "user")])
def test_ids_out_of_range(bad_id, where):
    values = [1, 2, 3, 4]
    if where == "item":
        values[3] = bad_id
    else:
        values[1] = bad_id
    rows = 7 if where == "item" else 10
    with pytest.raises(ValueError, match=rf"feature '{where}'.*id {bad_id} in sample 1 is out of range \[0, {rows}\)"):
        _ebc()(_kjt(values, lengths=torch.tensor([1, 1, 1, 1])))


def test_id_of_smaller_table_checked_for_shared_feature():
    configs = [jr.EmbeddingBagConfig(name="big", embedding_dim=2, num_embeddings=50, feature_names=["f"]),
               jr.EmbeddingBagConfig(name="small", embedding_dim=2, num_embeddings=5, feature_names=["f"])]
    with pytest.raises(ValueError, match=r"feature 'f' \(table 'big', 'small'\).*out of range \[0, 5\)"):
        jr.EmbeddingBagCollection(configs)(_kjt([9], lengths=torch.tensor([1]), keys=["f"]))


def test_unused_keys_are_not_checked():
    kjt = _kjt([1, 2, 999], lengths=torch.tensor([1, 1, 1]), keys=["user", "item", "other"])
    assert _ebc()(kjt).values().shape == (1, 7)


def test_validate_false_skips_data_checks():
    out = _ebc(validate=False)(_kjt([1, 2], lengths=torch.tensor([1, 0, 1, 0])))
    assert out.values().shape == (2, 7)


def test_weights_required_or_rejected():
    lengths = torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match="is_weighted=True but"):
        _ebc(is_weighted=True)(_kjt([1, 2], lengths=lengths))
    with pytest.raises(ValueError, match="has weights but.*is_weighted=False"):
        _ebc()(_kjt([1, 2], lengths=lengths, weights=torch.tensor([1.0, 2.0])))
    with pytest.raises(TypeError, match="floating point"):
        _ebc(is_weighted=True)(_kjt([1, 2], lengths=lengths, weights=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="1 weights for 2 ids"):
        _ebc(is_weighted=True)(_kjt([1, 2], lengths=lengths, weights=torch.tensor([1.0])))


def test_bad_configs():
    with pytest.raises(ValueError, match=r"duplicate table names: \['t'\]"):
        jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3)] * 2)
    with pytest.raises(ValueError, match="table 'z': embedding_dim must be positive, got 0"):
        jr.EmbeddingBagConfig(name="z", embedding_dim=0, num_embeddings=3)
    with pytest.raises(ValueError, match="table 'z': num_embeddings must be positive, got -2"):
        jr.EmbeddingBagConfig(name="z", embedding_dim=2, num_embeddings=-2)
    with pytest.raises(TypeError, match="num_embeddings must be an int"):
        jr.EmbeddingBagConfig(name="z", embedding_dim=2, num_embeddings=2.5)
    with pytest.raises(ValueError, match="non-empty name"):
        jr.EmbeddingBagConfig(num_embeddings=3, embedding_dim=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        jr.EmbeddingBagCollection(CONFIGS, backend="cuda")


@pytest.mark.parametrize("validate", [True, False])
def test_ids_without_bags(validate):
    """Empty lengths but three ids: the ids would be dropped (or, on the kernels, misread)."""
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="has 3 ids but no bags"):
            _ebc(validate=validate, backend=backend)(_kjt([1, 2, 3], lengths=torch.tensor([], dtype=torch.long)))


def test_lengths_and_offsets_that_disagree():
    # user: [1], [2]; item: [3], [] by the lengths, but [1], [2, 3], [], [] by the offsets
    kwargs = dict(lengths=torch.tensor([1, 1, 1, 0]), offsets=torch.tensor([0, 1, 3, 3, 3]))
    with pytest.raises(ValueError, match=r"feature 'user'.*lengths and offsets disagree: sample 1 has length 1, "
                                         r"but offsets 1 -> 3"):
        _ebc()(_kjt([1, 2, 3], **kwargs))
    with pytest.raises(ValueError, match="offsets must start at 0, got 1"):
        _ebc()(_kjt([1, 2, 3], lengths=torch.tensor([1, 1, 1, 0]), offsets=torch.tensor([1, 2, 3, 4, 4])))
    agreeing = _kjt([1, 2, 3], lengths=torch.tensor([1, 1, 1, 0]), offsets=torch.tensor([0, 1, 2, 3, 3]))
    assert _ebc()(agreeing).values().shape == (2, 7)


def test_lengths_win_over_disagreeing_offsets_without_validation():
    """validate=False trusts the batch; given both, eager and compiled both pool by the lengths."""
    torch._dynamo.reset()
    ebc = _ebc(validate=False)
    compiled = torch.compile(ebc, fullgraph=True)
    lengths, offsets = torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 3, 3, 3])
    by_lengths = ebc(_kjt([1, 2, 3], lengths=lengths)).values()
    both = _kjt([1, 2, 3], lengths=lengths, offsets=offsets)
    assert torch.equal(ebc(both).values(), by_lengths)
    assert torch.equal(compiled(both).values(), by_lengths)
    user, item = ebc.embedding_bags["t_user"].weight, ebc.embedding_bags["t_item"].weight
    assert torch.equal(by_lengths, torch.cat([torch.stack([user[1], user[2]]), torch.stack([item[3], item[0] * 0])], 1))
    assert both.offsets().tolist() == [0, 1, 3, 3, 3]  # the caller's offsets are left as given
    torch._dynamo.reset()


@pytest.mark.parametrize("validate", [True, False])
def test_tensors_of_the_wrong_rank(validate):
    lengths = torch.tensor([1, 1, 1, 0])
    with pytest.raises(ValueError, match=r"KJT weights must be 1-D \[N\], one per id, got shape \(3, 1\)"):
        _ebc(is_weighted=True, validate=validate)(_kjt([1, 2, 3], lengths=lengths, weights=torch.ones(3, 1)))
    with pytest.raises(ValueError, match=r"KJT lengths must be 1-D \[K\*B\], got shape \(2, 2\)"):
        _ebc(validate=validate)(_kjt([1, 2, 3], lengths=lengths.view(2, 2)))
    with pytest.raises(ValueError, match=r"KJT offsets must be 1-D \[K\*B\+1\], got shape \(1, 5\)"):
        _ebc(validate=validate)(_kjt([1, 2, 3], offsets=torch.tensor([[0, 1, 2, 3, 3]])))
    with pytest.raises(ValueError, match=r"KJT values must be 1-D \[N\] ids, got shape \(3, 1\)"):
        _ebc(validate=validate)(_kjt([[1], [2], [3]], lengths=lengths))


def test_negative_length_is_found_in_narrow_lengths():
    with pytest.raises(ValueError, match=r"feature 'item'.*sample 0 has negative length -1"):
        _ebc()(_kjt([1, 2], lengths=torch.tensor([1, 1, -1, 1], dtype=torch.int8)))


def test_wrong_per_key_counts_are_refused():
    """A KJT built with length_per_key= or offset_per_key= (as a loader that knows them passes
    them): the unpooled collection cuts its output by the counts and a sharded input routes by
    them, so every collection refuses wrong ones, naming the feature; right ones give the rows
    of a KJT without them."""
    configs = [jr.EmbeddingConfig(name="t_user", embedding_dim=4, num_embeddings=10, feature_names=["user"]),
               jr.EmbeddingConfig(name="t_item", embedding_dim=4, num_embeddings=7, feature_names=["item"])]
    ec = jr.EmbeddingCollection(configs)
    values, lengths = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 1, 0, 2])  # user: 3 ids, item: 2
    plain = ec(jr.KeyedJaggedTensor(["user", "item"], values, lengths=lengths))
    wrong = jr.KeyedJaggedTensor(["user", "item"], values, lengths=lengths, length_per_key=[2, 3])
    with pytest.raises(ValueError, match=r"feature 'user'.*length_per_key says 2 ids, its lengths add up to 3"):
        ec(wrong)
    shifted = jr.KeyedJaggedTensor(["user", "item"], values, lengths=lengths, offset_per_key=[0, 2, 5])
    with pytest.raises(ValueError, match=r"feature 'item'.*offset_per_key says its ids start at 2, its lengths put "
                                         r"them at 3"):
        ec(shifted)
    with pytest.raises(ValueError, match=r"EmbeddingBagCollection: feature 'user'.*length_per_key says 2"):
        jr.EmbeddingBagCollection([jr.EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10,
                                                         feature_names=["user"])])(wrong)
    right = ec(jr.KeyedJaggedTensor(["user", "item"], values, lengths=lengths, length_per_key=[3, 2]))
    for key in ("user", "item"):
        assert torch.equal(right[key].values(), plain[key].values())
        assert torch.equal(right[key].lengths(), plain[key].lengths())
    assert torch.equal(plain["user"].values(), ec.embeddings["t_user"].weight[[1, 2, 3]])
