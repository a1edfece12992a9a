"""Storage, state_dict compatibility with TorchRec, init and meta-device construction."""

import copy

import pytest
import torch

import jaggedrec as jr

CONFIGS = [
    jr.EmbeddingBagConfig(name="a", embedding_dim=5, num_embeddings=9, feature_names=["fa"]),
    jr.EmbeddingBagConfig(name="b", embedding_dim=3, num_embeddings=4, feature_names=["fb", "fc"],
                          pooling=jr.PoolingType.MEAN),
    jr.EmbeddingBagConfig(name="c", embedding_dim=5, num_embeddings=6, feature_names=["fc"],
                          data_type=jr.DataType.FP16),
]


def test_tables_are_views_of_one_flat_parameter_per_dtype():
    ebc = jr.EmbeddingBagCollection(CONFIGS)
    params = dict(ebc.named_parameters())
    assert set(params) == {"flat_weights.fp32", "flat_weights.fp16"}
    a = ebc.embedding_bags["a"].weight
    assert a.shape == (9, 5) and a.untyped_storage().data_ptr() == params["flat_weights.fp32"].untyped_storage().data_ptr()
    with torch.no_grad():
        a.data.fill_(2.5)
    assert (params["flat_weights.fp32"][a.storage_offset():a.storage_offset() + a.numel()] == 2.5).all()
    assert repr(ebc.embedding_bags["b"]) == "EmbeddingBag(4, 3, mode='mean')"


def test_state_dict_uses_torchrec_keys_and_round_trips():
    torch.manual_seed(0)
    src = jr.EmbeddingBagCollection(CONFIGS)
    state = src.state_dict()
    assert list(state) == ["embedding_bags.a.weight", "embedding_bags.b.weight", "embedding_bags.c.weight"]
    assert state["embedding_bags.c.weight"].dtype == torch.float16 and state["embedding_bags.b.weight"].shape == (4, 3)
    dst = jr.EmbeddingBagCollection(CONFIGS)
    assert not torch.equal(dst.embedding_bags["a"].weight, src.embedding_bags["a"].weight)
    dst.load_state_dict(state)
    for name in "abc":
        assert torch.equal(dst.embedding_bags[name].weight, src.embedding_bags[name].weight)
    nested = torch.nn.Sequential(src).state_dict()
    assert "0.embedding_bags.a.weight" in nested


def test_load_reports_missing_and_mismatched_tables():
    ebc = jr.EmbeddingBagCollection(CONFIGS)
    state = ebc.state_dict()
    del state["embedding_bags.b.weight"]
    with pytest.raises(RuntimeError, match="embedding_bags.b.weight"):
        ebc.load_state_dict(state)
    state = ebc.state_dict()
    state["embedding_bags.a.weight"] = torch.zeros(9, 4)
    with pytest.raises(RuntimeError, match="size mismatch for embedding_bags.a.weight"):
        ebc.load_state_dict(state)


def test_state_dict_loads_into_and_from_plain_embedding_bags():
    """TorchRec's unsharded EBC stores one nn.EmbeddingBag per table under these keys."""
    torchrec_like = torch.nn.Module()
    torchrec_like.embedding_bags = torch.nn.ModuleDict({
        c.name: torch.nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, dtype=c.data_type.to_torch())
        for c in CONFIGS})
    ebc = jr.EmbeddingBagCollection(CONFIGS)
    ebc.load_state_dict(torchrec_like.state_dict())
    assert torch.equal(ebc.embedding_bags["c"].weight, torchrec_like.embedding_bags["c"].weight)
    with torch.no_grad():
        ebc.embedding_bags["a"].weight.mul_(3)
    torchrec_like.load_state_dict(ebc.state_dict())
    assert torch.equal(ebc.embedding_bags["a"].weight, torchrec_like.embedding_bags["a"].weight)


def test_torchrec_state_dict_round_trip_when_installed():
    torchrec = pytest.importorskip("torchrec")
    configs = [torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                                           feature_names=c.feature_names) for c in CONFIGS[:2]]
    theirs = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    ours = jr.EmbeddingBagCollection(CONFIGS[:2])
    ours.load_state_dict(theirs.state_dict())
    kjt = jr.KeyedJaggedTensor(["fa", "fb", "fc"], torch.tensor([1, 2, 3, 0, 3]),
                               lengths=torch.tensor([2, 0, 1, 1, 0, 1]))
    their_kjt = torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths())
    assert torch.allclose(ours(kjt).values(), theirs(their_kjt).values(), atol=1e-6)
    theirs.load_state_dict(ours.state_dict())


def test_fused_checkpoints_move_to_and_from_torchrec_with_strict_false():
    """The README's recipe: a fused collection's optimizer state has no place in TorchRec's
    module, so checkpoints cross with strict=False, weights only, in both directions."""
    torchrec = pytest.importorskip("torchrec")
    from jaggedrec import optim
    configs = [torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                                           feature_names=c.feature_names) for c in CONFIGS[:2]]
    theirs = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    ours = jr.EmbeddingBagCollection(CONFIGS[:2], fused_optimizer=optim.RowWiseAdagrad(lr=0.1))
    kjt = jr.KeyedJaggedTensor(["fa", "fb", "fc"], torch.tensor([1, 2, 3, 0, 3]),
                               lengths=torch.tensor([2, 0, 1, 1, 0, 1]))
    ours(kjt).values().square().sum().backward()  # one step: weights and state move off their init
    state = ours.fused_optimizer_state.fp32_sum_sq.clone()
    assert state.any()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        theirs.load_state_dict(ours.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for name in ("a", "b"):
        assert torch.equal(theirs.embedding_bags[name].weight, ours.embedding_bags[name].weight)
    with torch.no_grad():
        theirs.embedding_bags["a"].weight.mul_(-2)
    with pytest.raises(RuntimeError, match="Missing key"):
        ours.load_state_dict(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=False)
    assert torch.equal(ours.embedding_bags["a"].weight, theirs.embedding_bags["a"].weight)
    assert torch.equal(ours.fused_optimizer_state.fp32_sum_sq, state)


def test_init_bounds_and_init_fn():
    torch.manual_seed(0)
    configs = [jr.EmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=100),
               jr.EmbeddingBagConfig(name="k", embedding_dim=4, num_embeddings=5,
                                     init_fn=lambda w: torch.nn.init.constant_(w, 0.25)),
               jr.EmbeddingBagConfig(name="m", embedding_dim=4, num_embeddings=5, weight_init_min=1.0,
                                     weight_init_max=2.0)]
    ebc = jr.EmbeddingBagCollection(configs)
    u = ebc.embedding_bags["u"].weight
    assert u.abs().max() <= 0.1 and u.std() > 0.03  # uniform in +-sqrt(1/100)
    assert (ebc.embedding_bags["k"].weight == 0.25).all()
    m = ebc.embedding_bags["m"].weight
    assert m.min() >= 1.0 and m.max() <= 2.0


def test_meta_device_then_materialise():
    ebc = jr.EmbeddingBagCollection(CONFIGS, device="meta")
    assert all(p.is_meta for p in ebc.parameters())
    ebc.to_empty(device="cpu")
    ebc.reset_parameters()
    assert ebc.embedding_bags["a"].weight.device.type == "cpu"
    assert ebc.embedding_bags["a"].weight.abs().max() <= (1 / 9) ** 0.5
    kjt = jr.KeyedJaggedTensor(["fa", "fb", "fc"], torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1]))
    assert ebc(kjt).values().shape == (1, 5 + 3 + 3 + 5)


def test_deepcopy_keeps_views_on_the_copy():
    ebc = jr.EmbeddingBagCollection(CONFIGS)
    twin = copy.deepcopy(ebc)
    with torch.no_grad():
        twin.embedding_bags["a"].weight.data.fill_(7.0)
    assert (twin.embedding_bags["a"].weight == 7.0).all()
    assert not (ebc.embedding_bags["a"].weight == 7.0).any()
