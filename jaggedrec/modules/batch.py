"""What an embedding module reads from a ``KeyedJaggedTensor``: the batch checked, its features
located among the KJT's keys, and a VBE batch spread to one stride with its inverse indices.

:func:`read_batch` is one ``torch.fx.wrap``'d call, so that ``torch.fx.symbolic_trace`` of a
module records it as one node and runs it on each real KJT: the key lookup and the checks
branch on the KJT's contents, which a traced graph cannot.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from jaggedrec.modules import validation
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.ops import vbe
from jaggedrec.modules.table_layout import StorageGroup
from jaggedrec.modules.validation import FeatureSpec


class Batch(NamedTuple):
    """A KJT as the pooling op takes it."""

    values: torch.Tensor             # [N] ids
    offsets: torch.Tensor            # [K*B'+1]; B' = B, or max(B_k) for VBE (see ops/vbe.py)
    weights: Optional[torch.Tensor]  # [N] per-id weights
    group_tables: List[List[int]]    # per storage group, the ops' ``tables`` argument (FeatureTables)
    num_keys: int                    # K
    batch_size: int                  # B
    # per storage group, [F_g, B] int64: the bag slot each sample reads, per feature; None
    # when every sample has its own bag
    group_inverse: List[Optional[torch.Tensor]]


@torch.fx.wrap
def read_batch(kjt: KeyedJaggedTensor, spec: FeatureSpec, groups: Tuple[StorageGroup, ...],
               output_features: Tuple[str, ...], validate: bool) -> Batch:
    """Check ``kjt`` (shapes always, data when ``validate``) and lay it out for the ops.

    Args:
        groups: the module's storage groups (one op call each).
        output_features: the KJT key of each output feature, in output order.
    """
    group_tables = group_feature_tables(tuple(kjt.keys()), groups, tuple(spec.key_rows), spec.owner)
    validation.check_static(kjt, spec)
    if validate:
        validation.check_data(kjt, spec)
    if kjt.variable_stride_per_key():
        offsets = vbe.vbe_offsets(kjt.lengths(), kjt.stride_per_key())
    else:
        offsets = kjt.lookup_offsets()
    inverse = _output_inverse_indices(kjt, output_features, spec, validate)
    if inverse is None:
        group_inverse = [None] * len(groups)
    else:
        group_inverse = [inverse.index_select(0, torch.tensor(g.features, device=inverse.device)) for g in groups]
    return Batch(kjt.values(), offsets, kjt.weights_or_none(), group_tables, len(kjt.keys()), kjt.stride(),
                 group_inverse)


def group_feature_tables(kjt_keys: Tuple[str, ...], groups: Tuple[StorageGroup, ...], needed: Tuple[str, ...],
                         owner: str) -> List[List[int]]:
    """Per group, its features located among ``kjt_keys``, as the ops' ``tables`` argument;
    raises naming the missing features. Cached per key order, except while compiling: the
    graph would guard on the cache, and a later eager call that fills it would force a
    recompile."""
    if torch.compiler.is_compiling():
        return _find_feature_tables(kjt_keys, groups, needed, owner)
    return _cached_feature_tables(kjt_keys, groups, needed, owner)


def _find_feature_tables(kjt_keys: Tuple[str, ...], groups: Tuple[StorageGroup, ...], needed: Tuple[str, ...],
                         owner: str) -> List[List[int]]:
    position = validation.key_indices(kjt_keys, needed, owner)
    return [g.feature_tables([position[f] for f in g.key_names], len(kjt_keys)) for g in groups]


_cached_feature_tables = functools.lru_cache(maxsize=256)(_find_feature_tables)


def _output_inverse_indices(kjt: KeyedJaggedTensor, output_features: Sequence[str], spec: FeatureSpec,
                            validate: bool) -> Optional[torch.Tensor]:
    """The KJT's inverse indices, ``[F, B]`` int64, one row per output feature; None without them."""
    inverse = kjt.inverse_indices_or_none()
    if inverse is None:
        if kjt.variable_stride_per_key():
            raise ValueError(f"{spec.owner}: the KeyedJaggedTensor has a variable batch per feature "
                             "(stride_per_key_per_rank) but no inverse_indices to expand its bags to the batch")
        return None
    keys, table = inverse
    row = {k: i for i, k in enumerate(keys)}
    missing = [f for f in dict.fromkeys(output_features) if f not in row]
    if missing:
        raise ValueError(f"{spec.owner}: features {missing} have no row in the KeyedJaggedTensor's "
                         f"inverse_indices (its keys: {list(keys)})")
    if table.dim() != 2 or table.shape[0] != len(keys):
        raise ValueError(f"{spec.owner}: inverse_indices must be [{len(keys)} keys, B], got shape {tuple(table.shape)}")
    validation.check_inverse_dtype(table, keys, spec)
    rows = [row[f] for f in output_features]
    per_feature = table.index_select(0, torch.tensor(rows, device=table.device)).long()
    if not validate:
        return per_feature
    if kjt.variable_stride_per_key():
        # positions from the key list, not the KJT's cached index_per_key(), which a graph would guard on
        position = {k: i for i, k in enumerate(kjt.keys())}
        strides = kjt.stride_per_key()
        bags = [strides[position[f]] for f in output_features]
    else:
        bags = kjt.stride()  # every key has the batch's B bags (compiled, a symbol of the graph)
    if torch.compiler.is_compiling():
        return validation.assert_inverse_in_graph(per_feature, bags, output_features, spec)
    if table.numel() and not table.is_meta:
        validation.check_inverse_range(per_feature, bags, output_features, spec)
    return per_feature


@torch.fx.wrap
def key_lengths(kjt: KeyedJaggedTensor, spec: FeatureSpec) -> List[int]:
    """``[K]`` ids of each key, for an op whose output has a row per id (eager: read from the
    device once per KJT, then cached in it, or the counts it carries, which ``read_batch``'s
    checks compared with its lengths; compiled: unbacked symbols of the graph)."""
    if kjt.variable_stride_per_key():
        raise ValueError(f"{spec.owner}: a KeyedJaggedTensor with a variable batch per feature "
                         "(stride_per_key_per_rank) is not supported here; pass one bag per sample")
    if torch.compiler.is_compiling():
        # counted in the graph rather than read from the KJT's cache (filled by any earlier
        # length_per_key(), kjt[key] or to_dict()): a graph that read the cached ints would
        # guard on them, and recompile for new counts
        return kjt.lengths().reshape(len(kjt.keys()), kjt.stride()).sum(1).tolist()
    return kjt.length_per_key()
