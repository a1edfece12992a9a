"""Input checks that turn a bad batch into an error naming the feature, not a wrong answer.

Shape and dtype checks are free and always run. Data checks (negative lengths, lengths
that don't add up, ids out of range) read one flag back from the device: on GPU that is a
synchronisation, which ``validate=False`` skips on hot paths. The common case costs one
min/max over the ids; the per-feature search runs only to word the error.

A compiled graph can read nothing back to the host, so there the data checks become asserts
in the graph (on CPU; see ``_assert_in_graph``).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, repeat_counts


class FeatureSpec(NamedTuple):
    """What the checks need to know about the features a module reads. A NamedTuple of plain
    values, so that a torch.fx graph can hold it as a constant argument."""

    key_rows: Dict[str, int]           # KJT key -> rows of the smallest table it indexes
    key_tables: Dict[str, List[str]]   # KJT key -> names of the tables it indexes
    is_weighted: Optional[bool]        # None: weights are not read (an EmbeddingCollection ignores them)
    owner: str


def _label(spec: FeatureSpec, key: str) -> str:
    return f"{spec.owner}: feature '{key}' (table {', '.join(repr(t) for t in spec.key_tables[key])})"


def key_indices(kjt_keys: Sequence[str], needed: Sequence[str], owner: str) -> Dict[str, int]:
    """Map each needed feature to its position among the KJT's keys, or raise naming the missing ones."""
    position = {k: i for i, k in enumerate(kjt_keys)}
    missing = [k for k in needed if k not in position]
    if missing:
        raise ValueError(f"{owner}: features {missing} are configured but missing from the "
                         f"KeyedJaggedTensor (its keys: {list(kjt_keys)})")
    if len(position) != len(kjt_keys):
        dup = sorted({k for k in kjt_keys if list(kjt_keys).count(k) > 1})
        raise ValueError(f"{owner}: the KeyedJaggedTensor repeats keys {dup}")
    return position


def check_static(kjt: KeyedJaggedTensor, spec: FeatureSpec) -> None:
    """Checks on dtypes and shapes only: no device data is read."""
    values, weights = kjt.values(), kjt.weights_or_none()
    features = list(spec.key_rows)
    if values.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{spec.owner}: features {features}: ids must be int32 or int64, got {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"{spec.owner}: KJT values must be 1-D [N] ids, got shape {tuple(values.shape)}")
    if spec.is_weighted and weights is None:
        raise ValueError(f"{spec.owner}: is_weighted=True but the KeyedJaggedTensor for features "
                         f"{features} has no weights")
    if spec.is_weighted is False and weights is not None:
        raise ValueError(f"{spec.owner}: the KeyedJaggedTensor for features {features} has weights but the "
                         "collection was built with is_weighted=False")
    if weights is not None and spec.is_weighted is not None:
        if not weights.is_floating_point():
            raise TypeError(f"{spec.owner}: per-id weights must be floating point, got {weights.dtype}")
        if weights.dim() != 1:
            raise ValueError(f"{spec.owner}: KJT weights must be 1-D [N], one per id, got shape "
                             f"{tuple(weights.shape)}")
        if torch.compiler.is_compiling():
            # Compiled, both counts are unbacked sizes (see KeyedJaggedTensor): an `if` cannot
            # compare them, a check can, and it makes them one symbol for the rest of the graph.
            torch._check(weights.shape[0] == values.shape[0],
                         lambda: "KeyedJaggedTensor: per-id weights and ids differ in number")
        elif weights.shape != values.shape:
            raise ValueError(f"{spec.owner}: {weights.numel()} weights for {values.numel()} ids")
    num_keys, stride = len(kjt.keys()), kjt.stride()
    if kjt.lengths_or_none() is None and kjt.offsets_or_none() is None and num_keys:
        raise ValueError(f"{spec.owner}: the KeyedJaggedTensor has neither lengths nor offsets")
    vbe = kjt.variable_stride_per_key()
    num_bags = _check_vbe_strides(kjt, spec) if vbe else num_keys * stride
    lengths = kjt.lengths_or_none()
    # compiled, check only what the graph reads: offsets cached beside lengths are not (see offsets())
    offsets = None if lengths is not None and torch.compiler.is_compiling() else kjt.offsets_or_none()
    for name, t, expected, extra in (("lengths", lengths, "[K*B]", 0), ("offsets", offsets, "[K*B+1]", 1)):
        if t is None:
            continue
        if t.dim() != 1:
            raise ValueError(f"{spec.owner}: KJT {name} must be 1-D {expected}, got shape {tuple(t.shape)}")
        if t.numel() != num_bags + extra:
            expected = f"{num_bags} bags (the sum of stride_per_key)" if vbe else f"{num_keys} keys x batch {stride}"
            raise ValueError(f"{spec.owner}: {name} has {t.numel()} entries, expected {expected}"
                             + (" + 1" if extra else ""))
    _check_ids_have_bags(values, num_bags, spec)


def _check_vbe_strides(kjt: KeyedJaggedTensor, spec: FeatureSpec) -> int:
    """A VBE KJT's strides, checked against its keys; returns its number of bags."""
    spkpr = kjt.stride_per_key_per_rank_tensor()
    if spkpr.dim() != 2 or spkpr.shape[0] != len(kjt.keys()):
        raise ValueError(f"{spec.owner}: stride_per_key_per_rank must be [keys, ranks] = [{len(kjt.keys())}, R], "
                         f"got shape {tuple(spkpr.shape)}")
    per_key = kjt.stride_per_key()
    negative = [k for k, b in zip(kjt.keys(), per_key) if b < 0]
    if negative:
        raise ValueError(f"{spec.owner}: features {negative} have a negative stride in stride_per_key_per_rank")
    return sum(per_key)


def _check_ids_have_bags(values: torch.Tensor, num_bags, spec: FeatureSpec) -> None:
    """A batch of no bags (empty lengths) must hold no ids: they would be dropped
    silently. Free: it compares sizes, with or without ``validate``."""
    if not torch.compiler.is_compiling():
        if num_bags == 0 and values.numel() > 0:
            raise ValueError(f"{spec.owner}: the KeyedJaggedTensor has {values.numel()} ids but no bags "
                             "(its lengths are empty): every id must belong to a bag")
    elif statically_known_true(num_bags == 0):
        torch._check(values.shape[0] == 0, lambda: f"{spec.owner}: the KeyedJaggedTensor has ids but no bags")


def check_data(kjt: KeyedJaggedTensor, spec: FeatureSpec) -> None:
    """Checks that read the batch: lengths (and offsets, when given beside them), and id ranges.
    One device-to-host read when all is well."""
    if torch.compiler.is_compiling():
        _assert_in_graph(kjt, spec)
        return
    keys, bag_starts = kjt.keys(), kjt.lengths_offset_per_key()
    values = kjt.values()
    num_ids = values.numel()
    if bag_starts[-1] == 0 or values.is_meta:
        return  # no bags (check_static saw to it that there are no ids), or no data to read
    lengths = kjt.lengths_or_none()
    both = kjt.has_unchecked_offsets()  # given lengths and offsets: compared, then the offsets serve
    offsets = kjt.offsets() if both else kjt.lookup_offsets()
    if values.device.type == "cpu":
        lengths_ok, ids_ok = _host_batch_ok(values, lengths, offsets, both, min(spec.key_rows.values()))
        if lengths_ok:
            if not ids_ok:  # some id past the smallest table: each key against its own
                used = [kjt.index_per_key()[k] for k in spec.key_rows]
                _check_id_ranges(values, offsets, bag_starts, keys, spec, used)
            _accept(kjt, offsets, bag_starts, spec, both)
            return
    # a bad batch (or one on a device): each check on its own, to word the error
    if lengths is None:
        lengths = offsets[1:] - offsets[:-1]
    low, high = torch.aminmax(values) if num_ids else (offsets.new_zeros(()), offsets.new_zeros(()))
    # lengths are checked themselves, summed in int64, so that narrow or wrapped sums cannot hide
    checks = [lengths.min(), offsets[0], lengths.sum(dtype=torch.int64), low, high]
    if both:
        checks.append((offsets[1:] - offsets[:-1] != lengths).any())
    # shortest bag, first offset, id count, smallest and largest id: on a device, gathered for one
    # read back to the host; on the host, each read as it is (a stack and casts cost more there)
    if values.device.type == "cpu":
        shortest, first, total, low, high, *disagree = [int(t) for t in checks]
    else:
        shortest, first, total, low, high, *disagree = torch.stack([t.long() for t in checks]).tolist()
    bad_length, bad_start, bad_total = shortest < 0, first != 0, total != num_ids
    if not (bad_length or bad_start or bad_total or any(disagree) or low < 0 or high >= min(spec.key_rows.values())):
        _accept(kjt, offsets, bag_starts, spec, both)
        return
    if bad_length:
        where = int(torch.nonzero(lengths < 0)[0])
        k, sample = _bag_position(bag_starts, where)
        raise ValueError(f"{_feature_label(spec, keys, k)}: sample {sample} has negative length {int(lengths[where])}")
    if bad_start:
        raise ValueError(f"{spec.owner}: offsets must start at 0, got {first}")
    if bad_total:
        raise ValueError(f"{spec.owner}: lengths add up to {total} but values has {num_ids} ids")
    if any(disagree):
        where = int(torch.nonzero(offsets[1:] - offsets[:-1] != lengths)[0])
        k, sample = _bag_position(bag_starts, where)
        raise ValueError(f"{_feature_label(spec, keys, k)}: the KJT's lengths and offsets "
                         f"disagree: sample {sample} has length {int(lengths[where])}, but offsets "
                         f"{int(offsets[where])} -> {int(offsets[where + 1])}")
    _check_id_ranges(values, offsets, bag_starts, keys, spec, [kjt.index_per_key()[k] for k in spec.key_rows])
    _accept(kjt, offsets, bag_starts, spec, both)  # ids past the smallest table, each within its own


def _accept(kjt: KeyedJaggedTensor, offsets: torch.Tensor, bag_starts: List[int], spec: FeatureSpec,
            both: bool) -> None:
    """A batch whose lengths, offsets and ids passed: its given offsets may serve, and the
    per-key counts it carries must still agree with them."""
    if both:
        kjt.mark_offsets_checked()
    _check_carried_counts(kjt, offsets, bag_starts, spec)


def _host_batch_ok(values: torch.Tensor, lengths: Optional[torch.Tensor], offsets: torch.Tensor, both: bool,
                   rows: int) -> Tuple[bool, bool]:
    """The data checks of :func:`check_data` on a CPU batch, in as few torch calls as its layout
    allows (each costs microseconds, which a small batch notices). Returns whether the lengths
    and offsets pass (lengths not negative; offsets from 0 to the id count, and equal to the
    lengths' running sum when both are given), and whether every id is in ``[0, rows)``. A
    failure sends the caller to the one-by-one checks, which find and word the error.

    Args:
        values: ``[N]`` ids; lengths: ``[K*B]`` or None; offsets: ``[K*B+1]``, ``K*B >= 1``;
        both: the lengths and offsets were both given, not yet compared.
    """
    num_ids = values.shape[0]
    steps = None
    if lengths is None or both:
        steps = torch.diff(offsets)
        if both and not torch.equal(steps, lengths):
            return False, False
    lengths = steps if lengths is None else lengths
    if int(lengths.min()) < 0:
        return False, False
    first, last = offsets[::offsets.shape[0] - 1].tolist()
    # int64 offsets whose steps are the (non-negative) lengths end at the lengths' int64 sum, wrap
    # for wrap; int32 ones could wrap past 2**31 and still end at N, so their lengths are summed
    if first != 0 or last != num_ids or (offsets.dtype != torch.int64
                                         and int(lengths.sum(dtype=torch.int64)) != num_ids):
        return False, False
    if not num_ids:
        return True, True
    low, high = torch.aminmax(values)
    return True, int(low) >= 0 and int(high) < rows


def _check_carried_counts(kjt: KeyedJaggedTensor, offsets: torch.Tensor, bag_starts: List[int],
                          spec: FeatureSpec) -> None:
    """The per-key id counts and starts a KJT carries (``length_per_key=`` / ``offset_per_key=``
    at construction, or an earlier call's cache) against its offsets: modules cut ids by them
    (the unpooled collection's output, the sharded input's routing), so wrong ones must not pass.
    One read of the ``K+1`` key starts, only when the KJT carries counts."""
    lengths, starts = kjt.length_per_key_or_none(), kjt.offset_per_key_or_none()
    if lengths is None and starts is None:
        return
    found = offsets.index_select(0, torch.tensor(bag_starts, device=offsets.device)).tolist()
    for k, key in enumerate(kjt.keys()):
        if lengths is not None and lengths[k] != found[k + 1] - found[k]:
            raise ValueError(f"{spec.owner}: feature '{key}': the KeyedJaggedTensor's length_per_key says "
                             f"{lengths[k]} ids, its lengths add up to {found[k + 1] - found[k]}")
        if starts is not None and starts[k] != found[k]:
            raise ValueError(f"{spec.owner}: feature '{key}': the KeyedJaggedTensor's offset_per_key says its ids "
                             f"start at {starts[k]}, its lengths put them at {found[k]}")


def _bag_position(bag_starts: List[int], bag: int):
    """(key index, sample) of bag ``bag`` of the KJT's lengths."""
    k = max(i for i in range(len(bag_starts) - 1) if bag_starts[i] <= bag)
    return k, bag - bag_starts[k]


def _assert_in_graph(kjt: KeyedJaggedTensor, spec: FeatureSpec) -> None:
    """The data checks as ``torch._assert_async`` ops, for a compiled CPU forward.

    A graph holds them without a host read or a graph break, and a failing one raises a
    ``RuntimeError`` naming the feature (but not the id or sample: run eagerly for those).
    Without them an id past its table would silently read a neighbouring table's row.
    Skipped off CPU: on CUDA a failed assert is a device-side assert that ends the CUDA
    context, and the Triton kernels bounds-check ids themselves.
    """
    values, offsets, keys = kjt.values(), kjt.lookup_offsets(), kjt.keys()
    if values.device.type != "cpu" or not keys:
        return
    num_ids = values.shape[0]
    lengths_ok = ((offsets[1:] >= offsets[:-1]).all() & (offsets[0] == 0) & (offsets[-1] == num_ids))
    torch._assert_async(lengths_ok, _in_graph(f"{spec.owner}: the KeyedJaggedTensor has negative lengths, or "
                                              "lengths that do not add up to its number of ids"))
    position = key_indices(keys, list(spec.key_rows), spec.owner)
    if kjt.variable_stride_per_key():
        bag_starts = torch.tensor(kjt.lengths_offset_per_key(), device=offsets.device)
    else:  # from the batch's size, a symbol of the graph, rather than a list of constants
        bag_starts = torch.arange(len(keys) + 1, device=offsets.device) * kjt.stride()
    key_starts = offsets.index_select(0, bag_starts)
    # clamped so that lengths that don't add up cannot make a negative count or overrun [N]
    key_starts = key_starts.clamp(min=0, max=num_ids)
    key_counts = (key_starts[1:] - key_starts[:-1]).clamp(min=0)
    unchecked = torch.iinfo(values.dtype).max  # keys the module does not read
    limits = torch.tensor([spec.key_rows.get(k, unchecked) for k in keys], dtype=values.dtype, device=values.device)
    # [N] each id's limit; bad ids counted per key from a running count at the key bounds (no
    # per-id key lookup, no scatter into K counters: ~2x cheaper on CPU)
    limit_of_id = repeat_counts(limits, key_counts, output_size=num_ids)
    bad_so_far = torch.nn.functional.pad(((values < 0) | (values >= limit_of_id)).to(torch.int32).cumsum(0), (1, 0))
    bad_per_key = bad_so_far.index_select(0, key_starts[1:]) - bad_so_far.index_select(0, key_starts[:-1])
    for key, rows in spec.key_rows.items():
        torch._assert_async(bad_per_key[position[key]] == 0,
                            _in_graph(f"{_label(spec, key)}: ids out of range [0, {rows}) (checked in the "
                                      "compiled graph; run eagerly to see the id and sample)"))


def check_inverse_dtype(inverse: torch.Tensor, keys: Sequence[str], spec: FeatureSpec) -> None:
    """Inverse indices are bag numbers: float ones would be truncated (1.9 read as bag 1), bool
    ones read as bags 0 and 1. Free: a dtype check, with or without ``validate``."""
    if inverse.is_floating_point() or inverse.is_complex() or inverse.dtype == torch.bool:
        raise TypeError(f"{spec.owner}: inverse_indices (features {list(keys)}) must be an integer tensor "
                        f"of bag numbers, got {inverse.dtype}")


def check_inverse_range(inverse: torch.Tensor, bags: Union[List[int], int], features: Sequence[str],
                        spec: FeatureSpec) -> None:
    """Each sample's bag must exist: ``0 <= inverse[f] < bags[f]`` (one read to the host).

    Args:
        inverse: ``[F, B]`` per output feature, the bag each sample reads.
        bags: ``[F]`` bags of each feature's key (VBE's ``B_k``), or one count for all.
    """
    per_feature = bags if isinstance(bags, list) else [bags] * len(features)
    low, high = inverse.aminmax(dim=1)
    for f, n, lo, hi in zip(features, per_feature, low.tolist(), high.tolist()):
        if lo < 0 or hi >= n:
            raise ValueError(f"{spec.owner}: feature '{f}': inverse_indices hold {lo if lo < 0 else hi}, outside "
                             f"its {n} bags [0, {n})")


def assert_inverse_in_graph(inverse: torch.Tensor, bags: Union[List[int], int], features: Sequence[str],
                            spec: FeatureSpec) -> torch.Tensor:
    """:func:`check_inverse_range` as ``torch._assert_async`` ops, for a compiled CPU forward;
    a failing one raises a ``RuntimeError`` naming the feature (not the index: run eagerly).

    Without it an index past its key's ``B_k`` but below the widest key's reads an empty
    padding slot (zeros), and a negative one wraps to the key's last bag under Inductor.

    Args:
        inverse: ``[F, B]`` int64.
        bags: ``[F]`` ints, each feature's ``B_k`` (VBE: constants of the graph), or one count
            for all (the batch size, a symbol of the graph, which a message cannot print).
    Returns:
        ``inverse`` clamped into ``[0, bags)``, for the gathers: they then stay in bounds
        whichever order the compiled graph runs in, so that this assert is what fails, not
        Inductor's own bounds check, which names no feature. Unchanged off CPU (see
        ``_assert_in_graph``).
    """
    if inverse.device.type != "cpu":
        return inverse
    per_feature = isinstance(bags, list)
    limit = torch.tensor(bags, dtype=inverse.dtype, device=inverse.device).unsqueeze(1) if per_feature else bags
    in_range = ((inverse >= 0) & (inverse < limit)).all(dim=1)
    for i, f in enumerate(features):
        if f in features[:i]:
            continue  # a key read by several tables: one check
        where = f"its {bags[i]} bags [0, {bags[i]})" if per_feature else "its bags [0, B)"
        torch._assert_async(in_range[i], _in_graph(f"{spec.owner}: feature '{f}': inverse_indices outside {where} "
                                                   "(checked in the compiled graph; run eagerly to see the index)"))
    return inverse.clamp(max=limit - 1).clamp(min=0)


def _in_graph(message: str) -> str:
    """Inductor pastes assert messages into C++ string literals unescaped."""
    return message.replace("\\", "/").replace('"', "'").replace("\n", " ")


def _feature_label(spec: FeatureSpec, keys: Sequence[str], k: int) -> str:
    key = keys[k]
    return _label(spec, key) if key in spec.key_tables else f"{spec.owner}: feature '{key}'"


def _check_id_ranges(values: torch.Tensor, offsets: torch.Tensor, bag_starts: List[int], keys: Sequence[str],
                     spec: FeatureSpec, used: List[int]) -> None:
    starts = offsets.index_select(0, torch.tensor(bag_starts, device=offsets.device)).tolist()
    for k in used:
        key = keys[k]
        ids = values[starts[k]:starts[k + 1]]
        if ids.numel() == 0:
            continue
        rows = spec.key_rows[key]
        bad = torch.nonzero((ids < 0) | (ids >= rows))
        if bad.numel():
            i = int(bad[0])
            sample = int(torch.searchsorted(offsets, starts[k] + i, right=True)) - 1 - bag_starts[k]
            raise ValueError(f"{_label(spec, key)}: id {int(ids[i])} in sample {sample} is out of "
                             f"range [0, {rows})")
