"""``RandomRecDataset``: endless seeded random ``Batch`` es, at TorchRec's path
(``torchrec.datasets.random``), for examples, benchmarks and tests that need DLRM input
without data.

Each batch holds, per sparse feature, ``B`` bags whose sizes are uniform in
``[min_ids, ids]`` and whose ids are uniform in ``[0, hash_size)``; ``num_dense`` standard
normal dense features per sample; and 0/1 labels. Drawn from one ``torch.Generator`` (seeded
by ``manual_seed``) in this order: for each feature its lengths then its ids, then the dense
features, then the labels. The same seed and sizes give the same batches as TorchRec's
dataset.
"""

import itertools
import sys
from typing import Iterator, List, Optional

import torch
from torch.utils.data.dataset import IterableDataset

from jaggedrec.datasets.utils import Batch
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor


def _per_key(name: str, many: Optional[List[int]], one: Optional[int], keys: List[str]) -> List[int]:
    if many is None:
        return [one] * len(keys)
    if len(many) != len(keys):
        raise ValueError(f"RandomRecDataset: {name} has {len(many)} entries for {len(keys)} keys")
    return list(many)


class _BatchSource:
    """Draws batches; keeps ``num_generated_batches`` of them and cycles through those (a
    negative count draws a fresh batch every time)."""

    def __init__(self, keys: List[str], batch_size: int, hash_sizes: List[int], ids_per_features: List[int],
                 num_dense: int, manual_seed: Optional[int], num_generated_batches: int,
                 min_ids_per_features: List[int]) -> None:
        self.keys, self.batch_size, self.num_dense = list(keys), batch_size, num_dense
        self.hash_sizes, self.ids_per_features = hash_sizes, ids_per_features
        self.min_ids_per_features = min_ids_per_features
        self.generator: Optional[torch.Generator] = None
        if manual_seed is not None:
            self.generator = torch.Generator().manual_seed(manual_seed)
        self.num_generated_batches = num_generated_batches
        self.cache = [self.draw() for _ in range(max(num_generated_batches, 0))]

    def draw(self) -> Batch:
        g, B = self.generator, self.batch_size
        lengths, values = [], []
        for lo, hi, n in zip(self.min_ids_per_features, self.ids_per_features, self.hash_sizes):
            bag_sizes = torch.randint(lo, hi + 1, (B,), dtype=torch.int32, generator=g)
            lengths.append(bag_sizes)
            values.append(torch.randint(0, n, (int(bag_sizes.sum()),), generator=g))
        sparse = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=torch.cat(values),
                                                     lengths=torch.cat(lengths))
        dense = torch.randn(B, self.num_dense, generator=g)
        labels = torch.randint(0, 2, (B,), generator=g)
        return Batch(dense_features=dense, sparse_features=sparse, labels=labels)

    def __iter__(self) -> Iterator[Batch]:
        if self.num_generated_batches < 0:
            while True:
                yield self.draw()
        if self.cache:
            yield from itertools.cycle(self.cache)


class RandomRecDataset(IterableDataset[Batch]):
    """Random recommendation batches, as TorchRec's dataset of the same name.

    Args:
        keys: the sparse feature names.
        batch_size: ``B``, samples per batch.
        hash_size: ids are drawn from ``[0, hash_size)`` for every key (100 when not given).
        hash_sizes: one such bound per key; overrides ``hash_size``.
        ids_per_feature: the most ids in one bag, for every key (2 when not given).
        ids_per_features: one such count per key; overrides ``ids_per_feature``.
        num_dense: dense features per sample.
        manual_seed: seeds the generator; without it the global torch RNG is used.
        num_batches: batches per iteration over the dataset (endless when None).
        num_generated_batches: batches drawn once and cycled through; negative: a fresh
            batch each time.
        min_ids_per_feature: the fewest ids in one bag, for every key. Defaults to
            ``ids_per_feature``, so ``ids_per_feature=1`` alone means exactly one id a bag;
            0 when neither is given.
        min_ids_per_features: one such count per key; overrides ``min_ids_per_feature``.

    Each item is a ``Batch``: ``dense_features`` ``[B, num_dense]`` float32,
    ``sparse_features`` a KJT over ``keys`` (int32 lengths, int64 ids), ``labels`` ``[B]``
    int64 of 0/1.
    """

    def __init__(
        self,
        keys: List[str],
        batch_size: int,
        hash_size: Optional[int] = None,
        hash_sizes: Optional[List[int]] = None,
        ids_per_feature: Optional[int] = None,
        ids_per_features: Optional[List[int]] = None,
        num_dense: int = 50,
        manual_seed: Optional[int] = None,
        num_batches: Optional[int] = None,
        num_generated_batches: int = 10,
        min_ids_per_feature: Optional[int] = None,
        min_ids_per_features: Optional[List[int]] = None,
    ) -> None:
        super().__init__()
        keys = list(keys)
        # falsy values (None or 0) fall back to the defaults, as in TorchRec
        hash_sizes = _per_key("hash_sizes", hash_sizes, hash_size or 100, keys)
        ids_per_features = _per_key("ids_per_features", ids_per_features, ids_per_feature or 2, keys)
        if min_ids_per_feature is None:
            min_ids_per_feature = ids_per_feature
        min_ids_per_features = _per_key("min_ids_per_features", min_ids_per_features, min_ids_per_feature or 0, keys)
        for key, lo, hi, n in zip(keys, min_ids_per_features, ids_per_features, hash_sizes):
            if not 0 <= lo <= hi:
                raise ValueError(f"RandomRecDataset: feature {key!r} asks for {lo} to {hi} ids a bag")
            if n <= 0:
                raise ValueError(f"RandomRecDataset: feature {key!r} has hash size {n}; it must be positive")
        self.batch_generator = _BatchSource(keys, batch_size, hash_sizes, ids_per_features, num_dense, manual_seed,
                                            num_generated_batches, min_ids_per_features)
        self.num_batches: int = sys.maxsize if num_batches is None else num_batches

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(iter(self.batch_generator), self.num_batches)

    def __len__(self) -> int:
        return self.num_batches


__all__ = ["RandomRecDataset"]
