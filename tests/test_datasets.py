"""jaggedrec.datasets (RandomRecDataset, Batch, the Criteo names) and the quantized-collective
config at TorchRec's path; no TorchRec needed (tests/test_models_torchrec.py compares the
dataset with TorchRec's)."""

import pytest
import torch

from jaggedrec.datasets import criteo
from jaggedrec.datasets.random import RandomRecDataset
from jaggedrec.datasets.utils import Batch
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.streamable import Pipelineable


def _equal(a: Batch, b: Batch) -> bool:
    sa, sb = a.sparse_features, b.sparse_features
    return (torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
            and sa.keys() == sb.keys() and torch.equal(sa.values(), sb.values())
            and torch.equal(sa.lengths(), sb.lengths()))


def test_batches_are_drawn_in_the_documented_order():
    """The reference: one generator, per key its lengths then its ids, then dense, then labels."""
    keys, B, sizes, lo, hi = ["u", "v", "w"], 5, [7, 1, 300], [0, 2, 1], [3, 2, 4]
    ds = RandomRecDataset(keys=keys, batch_size=B, hash_sizes=sizes, ids_per_features=hi,
                          min_ids_per_features=lo, num_dense=4, manual_seed=11, num_batches=3,
                          num_generated_batches=-1)
    g = torch.Generator().manual_seed(11)
    for got in ds:
        lengths, values = [], []
        for n, a, b in zip(sizes, lo, hi):
            lengths.append(torch.randint(a, b + 1, (B,), dtype=torch.int32, generator=g))
            values.append(torch.randint(0, n, (int(lengths[-1].sum()),), generator=g))
        want = Batch(torch.randn(B, 4, generator=g),
                     KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths)),
                     torch.randint(0, 2, (B,), generator=g))
        assert _equal(got, want)


def test_seeded_dataset_is_deterministic_and_in_range():
    kw = dict(keys=["a", "b"], batch_size=16, hash_sizes=[5, 1000], ids_per_features=[3, 0], num_dense=7,
              num_batches=4)
    one, two, other = (list(RandomRecDataset(manual_seed=s, **kw)) for s in (3, 3, 4))
    assert len(one) == 4 and all(_equal(x, y) for x, y in zip(one, two))
    assert not all(_equal(x, y) for x, y in zip(one, other))
    for batch in one:
        kjt = batch.sparse_features
        assert kjt.keys() == ["a", "b"] and kjt.stride() == 16
        assert batch.dense_features.shape == (16, 7) and batch.dense_features.dtype == torch.float32
        assert batch.labels.shape == (16,) and set(batch.labels.tolist()) <= {0, 1}
        assert kjt.lengths().dtype == torch.int32 and kjt.values().dtype == torch.int64
        a, b = kjt["a"], kjt["b"]
        # without a minimum the bags hold 0..max ids; "b" allows none at all
        assert 0 <= int(a.lengths().min()) and int(a.lengths().max()) <= 3 and int(a.values().max()) < 5
        assert int(b.lengths().sum()) == 0
    # bags of every allowed size occur (0 included), so empty bags are exercised downstream
    assert set(torch.cat([x.sparse_features["a"].lengths() for x in one]).tolist()) == {0, 1, 2, 3}


def test_defaults_and_the_golden_example_arguments():
    # ids_per_feature alone also sets the minimum: exactly one id a bag, as the golden example uses
    ds = RandomRecDataset(keys=criteo.DEFAULT_CAT_NAMES, batch_size=8, hash_size=50, ids_per_feature=1,
                          num_dense=len(criteo.DEFAULT_INT_NAMES))
    batch = next(iter(ds))
    assert torch.equal(batch.sparse_features.lengths(), torch.ones(26 * 8, dtype=torch.int32))
    assert int(batch.sparse_features.values().max()) < 50 and batch.dense_features.shape == (8, 13)
    # nothing given: ids below 100, up to 2 ids a bag, 50 dense features, endless
    ds = RandomRecDataset(keys=["k"], batch_size=64, manual_seed=0)
    batch = next(iter(ds))
    assert int(batch.sparse_features.values().max()) < 100 and int(batch.sparse_features.lengths().max()) <= 2
    assert batch.dense_features.shape == (64, 50)
    it = iter(ds)
    assert len([next(it) for _ in range(25)]) == 25


def test_cached_batches_cycle_and_negative_count_draws_fresh():
    ds = RandomRecDataset(keys=["k"], batch_size=4, num_dense=2, manual_seed=1, num_batches=5,
                          num_generated_batches=2)
    got = list(ds)
    assert len(got) == len(ds) == 5
    assert got[0] is got[2] is got[4] and got[1] is got[3] and not _equal(got[0], got[1])
    assert [id(b) for b in ds] == [id(b) for b in got]  # a new iteration starts over
    fresh = list(RandomRecDataset(keys=["k"], batch_size=4, num_dense=2, manual_seed=1, num_batches=3,
                                  num_generated_batches=-1))
    assert len({id(b) for b in fresh}) == 3 and not _equal(fresh[0], fresh[2])


@pytest.mark.parametrize("kw, match", [
    (dict(hash_sizes=[10]), "hash_sizes has 1 entries for 2 keys"),
    (dict(ids_per_features=[1, 2, 3]), "ids_per_features has 3"),
    (dict(ids_per_features=[1, 2], min_ids_per_features=[2, 0]), "feature 'a' asks for 2 to 1 ids"),
    (dict(hash_sizes=[4, -1]), "feature 'b' has hash size -1"),
])
def test_bad_arguments_name_the_feature(kw, match):
    with pytest.raises(ValueError, match=match):
        RandomRecDataset(keys=["a", "b"], batch_size=2, **kw)


def test_batch_moves_and_is_pipelineable():
    batch = next(iter(RandomRecDataset(keys=["a", "b"], batch_size=3, num_dense=2, manual_seed=5)))
    assert isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, Batch) and moved is not batch and _equal(moved, batch)
    meta = batch.to(torch.device("meta"))
    assert meta.dense_features.is_meta and meta.labels.is_meta and meta.sparse_features.values().is_meta
    assert meta.sparse_features.keys() == ["a", "b"]
    batch.record_stream(None)  # host tensors have no stream: nothing to record, no error
    if not torch.cuda.is_available():
        pytest.skip("pin_memory and record_stream on a device need CUDA")
    pinned = batch.pin_memory()
    assert pinned.dense_features.is_pinned() and pinned.sparse_features.values().is_pinned()
    assert pinned.labels.is_pinned() and _equal(pinned, batch)
    stream = torch.cuda.Stream()
    on_gpu = pinned.to(torch.device("cuda"), non_blocking=True)
    on_gpu.record_stream(stream)
    assert _equal(on_gpu.to(torch.device("cpu")), batch)


def test_criteo_names():
    assert (criteo.INT_FEATURE_COUNT, criteo.CAT_FEATURE_COUNT, criteo.DAYS) == (13, 26, 24)
    assert criteo.DEFAULT_INT_NAMES[0] == "int_0" and criteo.DEFAULT_INT_NAMES[-1] == "int_12"
    assert criteo.DEFAULT_CAT_NAMES[0] == "cat_0" and criteo.DEFAULT_CAT_NAMES[-1] == "cat_25"
    assert len(set(criteo.DEFAULT_INT_NAMES)) == 13 and len(set(criteo.DEFAULT_CAT_NAMES)) == 26
    assert criteo.DEFAULT_COLUMN_NAMES == ["label", *criteo.DEFAULT_INT_NAMES, *criteo.DEFAULT_CAT_NAMES]


def test_quantized_collectives_are_refused_not_ignored():
    from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from jaggedrec.distributed.fbgemm_qcomm_codec import (
        CommType,
        QCommsConfig,
        get_qcomm_codecs_registry,
    )

    assert get_qcomm_codecs_registry(QCommsConfig()) is None  # fp32 both ways: nothing to compress
    assert EmbeddingBagCollectionSharder(qcomm_codecs_registry=get_qcomm_codecs_registry(QCommsConfig())) is not None
    # the golden example's NCCL config
    registry = get_qcomm_codecs_registry(QCommsConfig(forward_precision=CommType.FP16,
                                                      backward_precision=CommType.BF16))
    assert sorted(registry) == ["POOLED_EMBEDDINGS_ALL_TO_ALL", "POOLED_EMBEDDINGS_REDUCE_SCATTER",
                                "SEQUENCE_EMBEDDINGS_ALL_TO_ALL"]
    with pytest.raises(ValueError, match="POOLED_EMBEDDINGS_ALL_TO_ALL.*quantized collectives"):
        EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry)
    one = get_qcomm_codecs_registry(QCommsConfig(backward_precision=CommType.BF16),
                                    comm_ops=["POOLED_EMBEDDINGS_ALL_TO_ALL"], device=torch.device("cpu"))
    assert list(one) == ["POOLED_EMBEDDINGS_ALL_TO_ALL"] and str(CommType.BF16) == "bf16"
    with pytest.raises(TypeError, match="forward_precision"):
        QCommsConfig(forward_precision="fp16")
