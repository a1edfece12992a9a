"""Every collection takes TorchRec's own KeyedJaggedTensor as it is (a program written for
TorchRec builds its batches with ``torchrec.KeyedJaggedTensor``), and pools or looks up as
TorchRec's own module does on the same tables and the same object. Skipped without TorchRec."""

from __future__ import annotations

import pytest
import torch

import jaggedrec as jr
from jaggedrec import quant

# Every case builds TorchRec's objects (some before any other call), so the module is skipped whole.
pytest.importorskip("torchrec")

KEYS = ["f2", "x", "f0", "f1"]  # shuffled, with a key no table reads
ROWS = 6


def _tr():
    return pytest.importorskip("torchrec")


def _bag_configs(weighted: bool):
    # f0 read by two tables (f0@t0, f0@t1); odd dims; MEAN only unweighted (TorchRec weighs SUM bags only)
    return [jr.EmbeddingBagConfig(name="t0", embedding_dim=3, num_embeddings=ROWS, feature_names=["f0", "f2"]),
            jr.EmbeddingBagConfig(name="t1", embedding_dim=5, num_embeddings=ROWS, feature_names=["f1", "f0"],
                                  pooling=jr.PoolingType.SUM if weighted else jr.PoolingType.MEAN)]


def _their_bag_configs(configs):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    return [EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                               feature_names=list(c.feature_names), pooling=PoolingType[c.pooling.name])
            for c in configs]


def _their_kjt(case: str, dtype: torch.dtype, seed: int):
    """TorchRec's KJT for KEYS: empty bags, a key with no ids, duplicate ids."""
    tr = _tr()
    gen = torch.Generator().manual_seed(seed)
    weights = None
    if case == "vbe":
        strides = [[2], [3], [1], [4]]  # bags per key (one rank)
        lengths = torch.randint(0, 4, (sum(s[0] for s in strides),), generator=gen, dtype=dtype)
        values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen, dtype=dtype)
        weights = torch.rand(values.numel(), generator=gen)
        inverse = torch.stack([torch.randint(0, s[0], (5,), generator=gen) for s in strides])
        return tr.KeyedJaggedTensor(KEYS, values, weights, lengths=lengths, stride_per_key_per_rank=strides,
                                    inverse_indices=(KEYS, inverse))
    batch = 4
    lengths = torch.randint(0, 4, (len(KEYS) * batch,), generator=gen, dtype=dtype)
    lengths[2 * batch:3 * batch] = 0  # f0 has no ids
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen, dtype=dtype)
    if case == "weighted":
        weights = torch.rand(values.numel(), generator=gen)
    if case == "offsets":
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(dtype)
        return tr.KeyedJaggedTensor(KEYS, values, weights, offsets=offsets)
    return tr.KeyedJaggedTensor(KEYS, values, weights, lengths=lengths)


def _close(ours, theirs):
    assert ours.keys() == theirs.keys() and ours.length_per_key() == theirs.length_per_key()
    torch.testing.assert_close(ours.values(), theirs.values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case,backend", [("plain", "torch"), ("weighted", "torch"), ("offsets", "torch"),
                                          ("vbe", "torch"), ("plain", "triton"), ("vbe", "triton")])
def test_bag_collection_takes_torchrecs_kjt(case, backend, dtype):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    weighted = case in ("weighted", "vbe")
    torch.manual_seed(0)
    ours = jr.EmbeddingBagCollection(_bag_configs(weighted), is_weighted=weighted, backend=backend)
    theirs = EmbeddingBagCollection(_their_bag_configs(_bag_configs(weighted)), is_weighted=weighted)
    theirs.load_state_dict(ours.state_dict())
    kjt = _their_kjt(case, dtype, seed=3)
    _close(ours(kjt), theirs(kjt))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", ["plain", "weighted", "offsets"])
def test_sequence_collection_takes_torchrecs_kjt(case, dtype):
    """TorchRec's module needs one dim for every table; weights are ignored by both."""
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection
    spec = [("t0", ["f0", "f2"]), ("t1", ["f1", "f0"])]
    ours = jr.EmbeddingCollection([jr.EmbeddingConfig(name=n, embedding_dim=4, num_embeddings=ROWS, feature_names=f)
                                   for n, f in spec], backend="torch")
    theirs = EmbeddingCollection([EmbeddingConfig(name=n, embedding_dim=4, num_embeddings=ROWS, feature_names=f)
                                  for n, f in spec])
    theirs.load_state_dict(ours.state_dict())
    kjt = _their_kjt(case, dtype, seed=5)
    mine, expected = ours(kjt), theirs(kjt)
    assert list(mine) == list(expected)
    for name, jt in expected.items():
        torch.testing.assert_close(mine[name].values(), jt.values(), rtol=0, atol=0)
        torch.testing.assert_close(mine[name].lengths(), jt.lengths(), rtol=0, atol=0, check_dtype=False)


def _their_fp16_quant(configs, weighted, state):
    """TorchRec's quantized collection with FP16 rows of the float tables in ``state``."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
    float_theirs = EmbeddingBagCollection(_their_bag_configs(configs), is_weighted=weighted)
    float_theirs.load_state_dict(state)
    float_theirs.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.half))
    return QuantEmbeddingBagCollection.from_float(float_theirs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", ["plain", "weighted", "offsets"])
def test_quantized_collection_takes_torchrecs_kjt(case, dtype):
    """FP16 rows are the float rows rounded to nearest by both libraries, so the two quantized
    modules pool the very same rows."""
    _tr()
    weighted = case == "weighted"
    torch.manual_seed(1)
    float_ours = jr.EmbeddingBagCollection(_bag_configs(weighted), is_weighted=weighted)
    ours = quant.EmbeddingBagCollection.from_float(float_ours, jr.DataType.FP16)
    theirs = _their_fp16_quant(_bag_configs(weighted), weighted, float_ours.state_dict())
    kjt = _their_kjt(case, dtype, seed=7)
    _close(ours(kjt), theirs(kjt))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_quantized_collection_takes_torchrecs_vbe_kjt(dtype):
    """TorchRec's quantized module takes no VBE batch: the reference is TorchRec's float module
    over the same FP16 rows, widened back to fp32."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    _tr()
    torch.manual_seed(2)
    float_ours = jr.EmbeddingBagCollection(_bag_configs(True), is_weighted=True)
    ours = quant.EmbeddingBagCollection.from_float(float_ours, jr.DataType.FP16)
    theirs = EmbeddingBagCollection(_their_bag_configs(_bag_configs(True)), is_weighted=True)
    theirs.load_state_dict({k: v.half().float() for k, v in float_ours.state_dict().items()})
    kjt = _their_kjt("vbe", dtype, seed=9)
    _close(ours(kjt), theirs(kjt))


def test_bad_ids_in_torchrecs_kjt_are_named():
    tr = _tr()
    ebc = jr.EmbeddingBagCollection(_bag_configs(False))
    q = quant.EmbeddingBagCollection.from_float(ebc)
    kjt = tr.KeyedJaggedTensor(["f0", "f1", "f2"], torch.tensor([1, ROWS, 2]), lengths=torch.tensor([1, 1, 1]))
    for module in (ebc, q):
        with pytest.raises(ValueError, match=rf"feature 'f1'.*id {ROWS} in sample 0 is out of range"):
            module(kjt)
