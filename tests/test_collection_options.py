"""What other code reads of a collection: its options (``module.options``), its layout's output
names and widths, and its feature spec. The sharders and ``quant.EmbeddingBagCollection.from_float``
build new collections from these, so they must say what the constructor was given."""

import dataclasses

import pytest
import torch

import jaggedrec as jr
from jaggedrec import quant
from jaggedrec.modules import validation
from jaggedrec.modules.collection import CollectionOptions
from jaggedrec.optim import SGD, RowWiseAdagrad

BAGS = [
    jr.EmbeddingBagConfig(name="t0", embedding_dim=3, num_embeddings=7, feature_names=["f1", "f2"]),
    jr.EmbeddingBagConfig(name="t1", embedding_dim=5, num_embeddings=4, feature_names=["f2"],
                          pooling=jr.PoolingType.MEAN),
    jr.EmbeddingBagConfig(name="t2", embedding_dim=2, num_embeddings=9, feature_names=["f3"],
                          data_type=jr.DataType.FP16),
]
SEQS = [jr.EmbeddingConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                           feature_names=list(c.feature_names), data_type=c.data_type) for c in BAGS]


def _kjt(keys, generator, batch=3):
    lengths = torch.randint(0, 3, (len(keys) * batch,), generator=generator)
    values = torch.randint(0, 4, (int(lengths.sum()),), generator=generator)
    return jr.KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths)


@pytest.mark.parametrize("kwargs", [
    {},
    dict(backend="torch", sparse=True, validate=False, bounds_check="clamp", deterministic=False),
    dict(backend="triton", bounds_check="off", fused_optimizer=RowWiseAdagrad(lr=0.1)),
])
@pytest.mark.parametrize("cls,configs", [(jr.EmbeddingBagCollection, BAGS), (jr.EmbeddingCollection, SEQS)])
def test_options_say_what_the_constructor_was_given(cls, configs, kwargs):
    module = cls(configs, **kwargs)
    defaults = dict(backend="auto", sparse=False, validate=True, bounds_check="raise", deterministic=True,
                    fused_optimizer=None)
    expected = {**defaults, **kwargs}
    assert dataclasses.asdict(module.options) == dataclasses.asdict(CollectionOptions(**expected))
    assert module.options.fused_optimizer is expected["fused_optimizer"]
    assert module.fused_optimizer is expected["fused_optimizer"]
    assert module.validate == expected["validate"]


def test_options_are_frozen_and_validate_switches(monkeypatch):
    ebc = jr.EmbeddingBagCollection(BAGS, backend="torch", bounds_check="clamp")
    before = ebc.options
    with pytest.raises(dataclasses.FrozenInstanceError):
        ebc.options.backend = "triton"
    ebc.validate = False
    assert ebc.options.validate is False and ebc.validate is False
    assert ebc.options == dataclasses.replace(before, validate=False)
    assert before.validate is True  # the old object is untouched
    # the switch is what the forward reads: the data checks run only while it is on
    checked = []
    real = validation.check_data
    monkeypatch.setattr(validation, "check_data", lambda kjt, spec: checked.append(spec.owner) or real(kjt, spec))
    kjt = _kjt(["f1", "f2", "f3"], torch.Generator().manual_seed(0))
    ebc(kjt)
    assert checked == []
    ebc.validate = True
    ebc(kjt)
    assert checked == ["EmbeddingBagCollection"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(bounds_check="warn"), ValueError, "bounds_check must be one of"),
    (dict(fused_optimizer="sgd"), TypeError, "fused_optimizer must be a jaggedrec.optim config"),
    (dict(sparse=True, fused_optimizer=SGD(lr=0.1)), ValueError, "exclude each other"),
])
def test_bad_options_are_refused_by_constructor_and_options_alike(kwargs, error, match):
    with pytest.raises(error, match=match):
        jr.EmbeddingBagCollection(BAGS, **kwargs)
    with pytest.raises(error, match=match):
        CollectionOptions(**kwargs)


@pytest.mark.parametrize("keys", [["f1", "f2", "f3"], ["f3", "x", "f2", "f1"]])
def test_layout_names_and_dims_are_the_outputs_keys_and_widths(keys):
    """Expected from the configs by TorchRec's rule: tables in order, each table's features in
    order, a feature read by several tables named ``feature@table``."""
    ebc = jr.EmbeddingBagCollection(BAGS)
    expected_names = ["f1", "f2@t0", "f2@t1", "f3"]
    expected_dims = [3, 3, 5, 2]
    assert ebc.layout.embedding_names == expected_names
    assert ebc.layout.embedding_dims() == expected_dims
    out = ebc(_kjt(keys, torch.Generator().manual_seed(1)))
    assert out.keys() == expected_names and out.length_per_key() == expected_dims
    ec = jr.EmbeddingCollection(SEQS)
    assert ec.layout.embedding_names == expected_names
    assert list(ec(_kjt(keys, torch.Generator().manual_seed(2)))) == expected_names


def test_feature_spec_holds_each_keys_smallest_table():
    ebc = jr.EmbeddingBagCollection(BAGS, is_weighted=True)
    spec = ebc.feature_spec
    assert spec.key_rows == {"f1": 7, "f2": 4, "f3": 9}
    assert spec.key_tables == {"f1": ["t0"], "f2": ["t0", "t1"], "f3": ["t2"]}
    assert spec.is_weighted is True and spec.owner == "EmbeddingBagCollection"
    assert jr.EmbeddingCollection(SEQS).feature_spec.is_weighted is None


def test_from_float_takes_the_float_modules_options():
    ebc = jr.EmbeddingBagCollection(BAGS[:2], backend="torch", validate=False, bounds_check="clamp")
    q = quant.EmbeddingBagCollection.from_float(ebc)
    assert (q.options.backend, q.options.validate, q.options.bounds_check) == ("torch", False, "clamp")
    q = quant.EmbeddingBagCollection.from_float(ebc, validate=True, backend="auto")
    assert (q.options.backend, q.options.validate, q.options.bounds_check) == ("auto", True, "clamp")
