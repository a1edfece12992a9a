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
