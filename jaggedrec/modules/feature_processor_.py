"""Feature processors at TorchRec's path: modules that give each id of a feature a weight
before the weighted bag collection pools it.

``PositionWeightedModule`` (one feature, a ``JaggedTensor``) and
``PositionWeightedModuleCollection`` (several, a ``KeyedJaggedTensor``) weight an id by its
position in its bag: id ``p`` of a bag (``p = 0, 1, ...``) gets ``position_weight[p]``, a
learned ``[max_feature_length]`` parameter that starts at 1. A bag longer than
``max_feature_length`` has no weight for its last ids, and is refused with a ``ValueError``
naming the feature (TorchRec's gather fails on it too).

When a processor runs itself (on a ``JaggedTensor``, on a KJT, or in the sharded FPEBC
before its input dist), every position weight of a batch comes from one gather
(:func:`gather_position_weights`): each id's index into the features' concatenated weights
is its id number plus a per-bag shift (the bag's key base minus the bag's start), spread
over the bag's ids by one running sum. ``FeatureProcessedEmbeddingBagCollection`` instead
hands the concatenated weights (:func:`keyed_position_table`) to the collection's
position-weighted op, which reads them by position (``ops/position_pooled.py``).
"""

from __future__ import annotations

import abc
import functools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from jaggedrec.sparse.jagged_tensor import (JaggedTensor, KeyedJaggedTensor, as_keyed_jagged_tensor, repeat_counts,
                                             traced)

_INT32_MAX = 2 ** 31 - 1


class FeatureProcessor(nn.Module):
    """A processor of one feature: ``forward(JaggedTensor) -> JaggedTensor`` (same ids and
    lengths, new ``[N]`` weights)."""

    @abc.abstractmethod
    def forward(self, features: JaggedTensor) -> JaggedTensor:
        ...


class FeatureProcessorsCollection(nn.Module):
    """A processor of several features: ``forward(KeyedJaggedTensor) -> KeyedJaggedTensor``."""

    @abc.abstractmethod
    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        ...


def gather_position_weights(table: torch.Tensor, offsets: torch.Tensor, bag_base: torch.Tensor,
                            num_ids) -> torch.Tensor:
    """``[N]`` per-id weights: id ``p`` of bag ``i`` reads ``table[bag_base[i] + p]``.

    Args:
        table: ``[P]`` float, the concatenated position weights.
        offsets: ``[n+1]`` the bags' starts (``offsets[-1] == N``).
        bag_base: ``[n]`` int64, where bag ``i``'s weights start in ``table``.
        num_ids: N.

    Bag lengths must already be known to fit (see :func:`check_bag_lengths`).

    The indices are a running sum: 1 per id, plus at each bag's start the change of shift from
    the bag before (empty bags telescope away), so one ``cumsum`` over ``[N]`` builds them. Eagerly
    on the CPU they are int32 when they fit: 164k ids cost ~0.45 ms (one thread, 2-core Xeon),
    where a ``repeat_interleave`` of the shifts plus an arange cost ~0.75 and int64 indices ~1.05,
    next to a ~12 ms pooled forward.
    """
    # a compiled graph's id count is unbacked: int64 there, rather than guard on its size
    narrow = not traced(num_ids, table.shape[0]) and num_ids <= _INT32_MAX and table.shape[0] <= _INT32_MAX
    dtype = torch.int32 if narrow else torch.int64
    shift = (bag_base - offsets[:-1]).to(dtype)
    change = torch.diff(shift, prepend=shift.new_zeros(1))
    steps = torch.ones(num_ids + 1, dtype=dtype, device=shift.device)
    steps[0] = 0
    steps.index_add_(0, offsets[:-1].long(), change)  # a start at N (trailing empty bags) lands in the spare slot
    index = steps[:num_ids].cumsum(0, dtype=dtype)
    return table.index_select(0, index)


def check_bag_lengths(lengths: torch.Tensor, bag_limit: torch.Tensor, bag_key: torch.Tensor,
                      keys: Sequence[str], limits: Sequence[int], owner: str) -> None:
    """Raise a ``ValueError`` naming the feature whose bag is longer than its
    ``max_feature_length``: eagerly one read to the host; compiled on the CPU an in-graph
    assert (a ``RuntimeError`` naming the processor); compiled elsewhere nothing (a failed
    device assert would end a CUDA context).

    Args:
        lengths: ``[n]`` ids per bag; bag_limit: ``[n]`` the longest bag allowed for each bag's
            feature; bag_key: ``[n]`` int64 each bag's key index into ``keys``.
        limits: per key, its ``max_feature_length``.
    """
    if torch.compiler.is_compiling():
        if lengths.device.type == "cpu":
            torch._assert_async((lengths <= bag_limit).all(),
                                f"{owner}: a bag is longer than its feature's max_feature_length "
                                "(checked in the compiled graph; run eagerly to see the feature)")
        return
    if lengths.numel() == 0 or lengths.is_meta:
        return
    over = lengths > bag_limit
    if not bool(over.any()):
        return
    bag = int(over.nonzero()[0, 0])
    k = int(bag_key[bag])
    raise ValueError(f"{owner}: feature '{keys[k]}' has a bag of {int(lengths[bag])} ids, longer than its "
                     f"max_feature_length {limits[k]}: its ids past position {limits[k] - 1} have no position "
                     "weight")


def _bag_layout(bags_per_key: Union[int, Tuple[int, ...]], limits: Tuple[int, ...], bases: Tuple[int, ...],
                lengths_dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bag: ``[n]`` int64 its key's index, ``[n]`` its key's longest bag allowed (in the
    lengths' dtype), ``[n]`` int64 where its key's weights start; for ``bags_per_key`` (one
    count for every key, or one per key: VBE)."""
    keys = torch.arange(len(limits), device=device)
    if isinstance(bags_per_key, tuple):
        bag_key = repeat_counts(keys, torch.tensor(bags_per_key, device=device))
    else:
        bag_key = keys.repeat_interleave(bags_per_key)  # an int: an expand, no parallel region
    bag_limit = torch.tensor(limits, dtype=lengths_dtype, device=device).index_select(0, bag_key)
    bag_base = torch.tensor(bases, dtype=torch.int64, device=device).index_select(0, bag_key)
    return bag_key, bag_limit, bag_base


# eager calls reuse the layout of a batch shape (never written to); a compiled graph builds it
# afresh, as a cache lookup would guard the graph on the cache
_cached_bag_layout = functools.lru_cache(maxsize=64)(_bag_layout)


def keyed_position_weights(features: KeyedJaggedTensor, weights: Mapping[str, torch.Tensor], owner: str,
                           lengths: Optional[torch.Tensor] = None,
                           offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N]`` per-id weights for a KJT: key ``k`` in ``weights`` reads its ``[L_k]`` tensor by
    position (bags of more than ``L_k`` ids are refused), every other key gets 1.

    Args:
        features: the batch (VBE too: positions depend only on the bags).
        weights: per key, its ``[L_k]`` position weights (all of one dtype and device).
        lengths, offsets: the KJT's ``lengths()`` and ``lookup_offsets()``, when the caller has them.
    """
    keys = features.keys()
    values = features.values()
    lengths = features.lengths() if lengths is None else lengths
    offsets = features.lookup_offsets() if offsets is None else offsets
    num_ids = values.shape[0]
    tables = [weights[k] for k in keys if k in weights]
    device = values.device
    dtype = tables[0].dtype if tables else torch.float32
    compiling = torch.compiler.is_compiling()
    if features.variable_stride_per_key():
        bags_per_key = tuple(features.stride_per_key())
    else:
        bags_per_key = features.stride()
    limits = [weights[k].shape[0] if k in weights else 0 for k in keys]
    bases, start = [], 0
    for k, limit in zip(keys, limits):
        bases.append(start)
        start += limit
    layout = _bag_layout if compiling else _cached_bag_layout
    if len(tables) < len(keys):
        # keys without position weights read a block of ones as long as their longest bag
        # (at most N): their bases all point at it and their limit is that block's length
        free = [i for i, k in enumerate(keys) if k not in weights]
        bag_key = layout(bags_per_key, tuple(limits), tuple(bases), lengths.dtype, device)[0]
        key_free = torch.zeros(len(keys), dtype=torch.bool, device=device)
        key_free[free] = True
        longest = num_ids
        if not compiling and lengths.numel() and not lengths.is_meta:
            longest = int(lengths.masked_fill(~key_free.index_select(0, bag_key), 0).max())
        tables.append(torch.ones(longest, dtype=dtype, device=device))
        for i in free:
            bases[i], limits[i] = start, longest
    bag_key, bag_limit, bag_base = layout(bags_per_key, tuple(limits), tuple(bases), lengths.dtype, device)
    check_bag_lengths(lengths, bag_limit, bag_key, keys, limits, owner)
    table = tables[0] if len(tables) == 1 else torch.cat(tables)
    return gather_position_weights(table, offsets, bag_base, num_ids)


def keyed_position_table(features: KeyedJaggedTensor, weights: Mapping[str, torch.Tensor],
                         owner: str) -> Tuple[torch.Tensor, List[int]]:
    """The position weights of a KJT's keys as ``position_weighted_embedding_bags`` reads them:
    ``[P]`` every weighted key's ``[L_k]`` tensor concatenated (in key order), and per key
    ``base, length`` flattened (``-1, -1`` for keys without position weights: weight 1).
    Bags longer than their key's ``L_k`` are refused here (see :func:`check_bag_lengths`)."""
    keys = features.keys()
    tables = [weights[k] for k in keys if k in weights]
    key_positions: List[int] = []
    start = 0
    for k in keys:
        if k in weights:
            key_positions += [start, weights[k].shape[0]]
            start += weights[k].shape[0]
        else:
            key_positions += [-1, -1]
    lengths = features.lengths()
    if features.variable_stride_per_key():
        bags_per_key: Union[int, Tuple[int, ...]] = tuple(features.stride_per_key())
    else:
        bags_per_key = features.stride()
    # a key without weights: no bag is too long for it
    limits = tuple(n if n >= 0 else _INT32_MAX for n in key_positions[1::2])
    layout = _bag_layout if torch.compiler.is_compiling() else _cached_bag_layout
    bag_key, bag_limit, _ = layout(bags_per_key, limits, tuple(max(b, 0) for b in key_positions[0::2]),
                                   lengths.dtype, lengths.device)
    check_bag_lengths(lengths, bag_limit, bag_key, keys, list(limits), owner)
    if not tables:
        table = torch.zeros(0, device=features.values().device)
    else:
        table = tables[0] if len(tables) == 1 else torch.cat(tables)
    return table, key_positions


class PositionWeightedModule(FeatureProcessor):
    """Weights each id of one feature by its position in its bag.

    Args:
        max_feature_length: the longest bag; ``position_weight`` is ``[max_feature_length]``,
            filled with 1.
        device: where the parameter lives.
    """

    def __init__(self, max_feature_length: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if max_feature_length <= 0:
            raise ValueError(f"PositionWeightedModule: max_feature_length must be positive, got {max_feature_length}")
        self.position_weight = nn.Parameter(torch.empty([max_feature_length], device=device))
        self._pre_processed = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.position_weight.fill_(1.0)

    @property
    def pre_processed(self) -> bool:
        """Whether ``forward`` reads positions from the input's weights (``pre_process_input``)."""
        return self._pre_processed

    def forward(self, features: JaggedTensor) -> JaggedTensor:
        """
        Args:
            features: ``[N]`` ids in ``[n]`` bags.
        Returns:
            the same ids and bags with ``[N]`` weights, ``position_weight[p]`` for the id at
            position ``p`` of its bag.
        """
        return position_weighted_jagged(self.position_weight, features, self._pre_processed)

    def pre_process_input(self, features: JaggedTensor) -> None:
        """Write each id's position into ``features``' weights, in place; ``forward`` then reads
        positions from there instead of computing them."""
        self._pre_processed = True
        lengths, offsets = features.lengths(), features.offsets()
        positions = torch.arange(features.values().shape[0], device=lengths.device) - repeat_counts(
            offsets[:-1].long(), lengths.long(), output_size=features.values().shape[0])
        features.weights().copy_(positions.to(torch.float32))


class PositionWeightedModuleCollection(FeatureProcessorsCollection):
    """Position weights for several features of a KJT; keys without an entry get weight 1.

    Args:
        max_feature_lengths: per feature, its longest bag (``position_weights[f]`` is
            ``[max_feature_lengths[f]]``, filled with 1).
        device: where the parameters live.
    """

    def __init__(self, max_feature_lengths: Dict[str, int], device: Optional[torch.device] = None) -> None:
        super().__init__()
        for key, length in max_feature_lengths.items():
            if length <= 0:
                raise ValueError(f"PositionWeightedModuleCollection: feature '{key}': max_feature_length must be "
                                 f"positive, got {length}")
        self.max_feature_lengths = dict(max_feature_lengths)
        self._pre_processed = False
        self.position_weights = nn.ParameterDict(
            {key: nn.Parameter(torch.empty([length], device=device)) for key, length in max_feature_lengths.items()})
        self.reset_parameters()

    @property
    def position_weights_dict(self) -> Dict[str, nn.Parameter]:
        """The parameters as a plain dict (TorchRec's name); always the registered ones, so it
        follows ``to()``, ``load_state_dict(assign=True)`` and the like."""
        return dict(self.position_weights.items())

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in self.position_weights.values():
                p.fill_(1.0)

    @property
    def pre_processed(self) -> bool:
        """Whether ``forward`` reads positions from the input's weights (``pre_process_input``)."""
        return self._pre_processed

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """
        Args:
            features: ``[N]`` ids of keys ``K`` (any order; VBE too).
        Returns:
            the same KJT with ``[N]`` weights: by position for the keys with position weights,
            1 for the others. A TorchRec KJT is taken as it is (its tensors shared).
        """
        if self._pre_processed:
            features = as_keyed_jagged_tensor(features)
            return with_weights(features, self._weights_from_positions(features))
        return position_weighted_kjt(features, self.position_weights_dict, "PositionWeightedModuleCollection")

    def _weights_from_positions(self, features: KeyedJaggedTensor) -> torch.Tensor:
        positions = features.weights().to(torch.int64)
        parts = []
        for key, jt_positions in zip(features.keys(), torch.split(positions, features.length_per_key())):
            if key in self.position_weights:
                parts.append(self.position_weights[key].index_select(0, jt_positions))
            else:
                parts.append(torch.ones(jt_positions.shape[0], device=positions.device))
        return torch.cat(parts) if parts else features.weights()

    def pre_process_input(self, features: KeyedJaggedTensor) -> None:
        """Write each id's position in its bag into ``features``' weights, in place."""
        self._pre_processed = True
        lengths, offsets = features.lengths(), features.lookup_offsets()
        num_ids = features.values().shape[0]
        positions = torch.arange(num_ids, device=lengths.device) - repeat_counts(
            offsets[:-1].long(), lengths.long(), output_size=num_ids)
        features.weights().copy_(positions.to(torch.float32))

    def copy(self, device: torch.device) -> nn.Module:
        """Move the parameters to ``device`` (TorchRec's ``CopyMixIn``)."""
        return self.to(device)


@torch.fx.wrap  # one node of a torch.fx graph: it branches on the batch
def position_weighted_jagged(position_weight: torch.Tensor, features: JaggedTensor,
                             pre_processed: bool) -> JaggedTensor:
    """``features`` weighted by ``position_weight`` (``[L]``) by position, or, when
    ``pre_processed``, by the positions its weights hold."""
    if pre_processed:
        weights = position_weight.index_select(0, features.weights().to(torch.int64))
    else:
        lengths, offsets = features.lengths(), features.offsets()
        limit = position_weight.shape[0]
        zeros = torch.zeros(lengths.shape[0], dtype=torch.int64, device=lengths.device)
        check_bag_lengths(lengths, torch.full_like(lengths, limit), zeros, ["feature"], [limit],
                          "PositionWeightedModule")
        weights = gather_position_weights(position_weight, offsets, zeros, features.values().shape[0])
    return JaggedTensor(values=features.values(), lengths=features.lengths(), offsets=features.offsets(),
                        weights=weights)


@torch.fx.wrap  # one node of a torch.fx graph: it branches on the batch
def position_weighted_kjt(features: KeyedJaggedTensor, weights: Mapping[str, torch.Tensor],
                          owner: str) -> KeyedJaggedTensor:
    """``features`` (jaggedrec's KJT or TorchRec's) with :func:`keyed_position_weights` as its weights."""
    features = as_keyed_jagged_tensor(features)
    lengths, offsets = features.lengths(), features.lookup_offsets()
    return with_weights(features, keyed_position_weights(features, weights, owner, lengths, offsets), lengths,
                        offsets)


def with_weights(features: KeyedJaggedTensor, weights: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                 offsets: Optional[torch.Tensor] = None) -> KeyedJaggedTensor:
    """``features`` with ``weights`` as its ``[N]`` per-id weights, sharing every other tensor
    and the batch layout (VBE and inverse indices included); ``lengths`` and ``offsets``: the
    KJT's ``lengths()`` and ``lookup_offsets()``, when the caller has them."""
    vbe = features.variable_stride_per_key()
    lengths = features.lengths() if lengths is None else lengths
    offsets = features.lookup_offsets() if offsets is None else offsets
    kjt = KeyedJaggedTensor(features.keys(), features.values(), weights, lengths=lengths, offsets=offsets,
                            stride=None if vbe else features.stride(),
                            stride_per_key_per_rank=features.stride_per_key_per_rank() if vbe else None,
                            length_per_key=features.length_per_key_or_none(),
                            offset_per_key=features.offset_per_key_or_none(),
                            inverse_indices=features.inverse_indices_or_none())
    kjt.mark_offsets_checked()  # the lengths' own offsets (lookup_offsets)
    return kjt


def position_weight_tables(processors: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Per feature, the position weights of ``processors`` (a ``{feature: processor}``
    ModuleDict or a collection processor) when they are all position weights read by
    position (not ``pre_processed``); else None, and the processors must run themselves."""
    if type(processors) is PositionWeightedModuleCollection:
        return None if processors.pre_processed else processors.position_weights_dict
    if not isinstance(processors, nn.ModuleDict):
        return None
    out: Dict[str, torch.Tensor] = {}
    for key, module in processors.items():
        if type(module) is not PositionWeightedModule or module.pre_processed:
            return None
        out[key] = module.position_weight
    return out

__all__: List[str] = ["FeatureProcessor", "FeatureProcessorsCollection", "PositionWeightedModule",
                      "PositionWeightedModuleCollection"]
