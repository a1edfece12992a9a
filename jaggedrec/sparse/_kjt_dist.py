"""The ``KeyedJaggedTensor`` methods that TorchRec's input all-to-all calls: what a rank sends
(:func:`dist_labels`, :func:`dist_splits`, :func:`dist_tensors`) and the KJT a rank builds from
what it received (:func:`dist_init`). Each function is the method of the same name.

The all-to-all sends, for every tensor of :func:`dist_tensors`, block ``j`` of each rank's
tensor to rank ``j``, where a rank's keys are ordered by destination and ``key_splits[j]`` of
them go to rank ``j``. Rank ``j`` so receives its ``K_j`` keys rank-major: rank 0's bags of each
of its keys, then rank 1's, and so on. :func:`dist_init` reorders them key-major (each key's
bags from rank 0, then rank 1, ...) by the ``recat`` permutation the sender computed, so that
the result is one KJT of the ``K_j`` keys over every rank's batch.

Written in plain torch ops (no FBGEMM), so that it runs wherever torch does. Imported by the
class's module, never importing it: :func:`dist_init` is handed the class to build.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from jaggedrec.sparse._segments import repeat_counts


def dist_labels(kjt) -> List[str]:
    labels = ["lengths", "values"]
    if kjt.variable_stride_per_key():
        labels.append("strides")
    if kjt.weights_or_none() is not None:
        labels.append("weights")
    return labels


def _sum_per_split(sizes: Sequence[int], key_splits: Sequence[int]) -> List[int]:
    out, first = [], 0
    for n in key_splits:
        out.append(sum(sizes[first:first + n]))
        first += n
    return out


def dist_splits(kjt, key_splits: List[int]) -> List[List[int]]:
    if any(n < 0 for n in key_splits) or sum(key_splits) != len(kjt.keys()):
        raise ValueError(f"dist_splits: key_splits {list(key_splits)} must be counts that add up to the "
                         f"{len(kjt.keys())} keys {kjt.keys()}")
    bags = _sum_per_split(kjt.stride_per_key(), key_splits)
    ids = _sum_per_split(kjt.length_per_key(), key_splits)
    splits = [bags, ids]
    if kjt.variable_stride_per_key():
        splits.append(list(key_splits))  # one stride per key
    if kjt.weights_or_none() is not None:
        splits.append(ids)
    return splits


def dist_tensors(kjt) -> List[torch.Tensor]:
    tensors = [kjt.lengths(), kjt.values()]
    if kjt.variable_stride_per_key():
        strides = torch.tensor(kjt.stride_per_key(), dtype=torch.int64)
        if kjt.device().type == "cuda":
            strides = strides.pin_memory()  # lets the copy below overlap the host
        tensors.append(strides.to(kjt.device(), non_blocking=True))
    if kjt.weights_or_none() is not None:
        tensors.append(kjt.weights())
    return tensors


def _offsets(sizes: torch.Tensor) -> torch.Tensor:
    """``[S+1]`` int64: the start of each of ``S`` segments, and the total."""
    return torch.nn.functional.pad(sizes.to(torch.int64).cumsum(0), (1, 0))


def _permute_segments(tensor: torch.Tensor, sizes: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``[sum(sizes), ...]``) cut into segments of ``sizes`` and joined again in
    ``order`` (a permutation of the segments): segment ``order[i]`` comes ``i``-th."""
    order = order.to(device=sizes.device, dtype=torch.int64)
    starts = _offsets(sizes)[:-1][order]
    out_sizes = sizes.to(torch.int64)[order]
    out_starts = _offsets(out_sizes)[:-1]
    # a permutation keeps the size, so no read back of the total
    shift = repeat_counts(starts - out_starts, out_sizes, output_size=tensor.size(0))
    index = torch.arange(tensor.size(0), device=tensor.device) + shift.to(tensor.device)
    return tensor.index_select(0, index)


def _ids_per_segment(lengths: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """``[S]`` ids in each segment of ``bags[s]`` consecutive bags of ``lengths``."""
    ends = _offsets(lengths)
    return ends[_offsets(bags).to(ends.device)].diff()


def dist_init(cls: type, keys: List[str], tensors: List[torch.Tensor], variable_stride_per_key: bool,
              num_workers: int, recat: Optional[torch.Tensor], stride_per_rank: Optional[List[int]],
              stagger: int = 1):
    if len(tensors) not in (2, 3, 4) or (variable_stride_per_key and len(tensors) == 2):
        raise ValueError(f"dist_init: got {len(tensors)} tensors; expected lengths, values"
                         f"{', strides' if variable_stride_per_key else ''} and optionally weights "
                         "(as dist_tensors sends them)")
    lengths, values = tensors[0], tensors[1]
    has_weights = len(tensors) == (4 if variable_stride_per_key else 3)
    weights = tensors[-1] if has_weights else None
    if variable_stride_per_key:
        # [R*K] bags of each key from each rank, rank-major
        strides = tensors[2]
        if strides.numel() != num_workers * len(keys):
            raise ValueError(f"dist_init: {strides.numel()} strides for {num_workers} ranks x {len(keys)} keys {keys}")
        bags = strides
    else:
        if stride_per_rank is None:
            raise ValueError("dist_init: stride_per_rank is needed when the keys have one batch size")
        if len(set(stride_per_rank)) > 1:
            bags = torch.ones_like(lengths)  # ranks' batches differ: the recat orders single bags
        else:
            stride = stride_per_rank[0] if stride_per_rank else 0
            bags = torch.full((lengths.numel() // stride if stride else 0,), stride, device=lengths.device)
    if recat is not None and lengths.numel() > 0:
        if recat.numel() != bags.numel():
            raise ValueError(f"dist_init: recat orders {recat.numel()} segments, but the received lengths of keys "
                             f"{keys} come in {bags.numel()}")
        ids = _ids_per_segment(lengths, bags)
        lengths = _permute_segments(lengths, bags, recat)
        values = _permute_segments(values, ids, recat)
        weights = None if weights is None else _permute_segments(weights, ids, recat)
    if not variable_stride_per_key:
        return cls(keys, values, weights, lengths=lengths, stride=sum(stride_per_rank)).sync()
    per_key_per_rank = strides.view(num_workers, len(keys)).t().cpu()
    if per_key_per_rank.numel() == 0:
        per_key_per_rank = torch.zeros((len(keys), 1), dtype=torch.int64)
    if stagger > 1:
        # the recat took the ranks in strides of num_workers // stagger (0, R/s, ..., 1, 1 + R/s, ...):
        # the strides' columns must come in the values' rank order
        per_key_per_rank = per_key_per_rank[:, torch.arange(num_workers).view(stagger, -1).t().reshape(-1)]
    return cls(keys, values, weights, lengths=lengths, stride_per_key_per_rank=per_key_per_rank).sync()
