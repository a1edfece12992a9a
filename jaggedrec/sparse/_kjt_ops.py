"""The bodies of the ``KeyedJaggedTensor`` methods that build new KJTs from existing ones:
``permute``, ``split`` and ``flatten_lengths`` (one KJT's keys), ``concat`` (several KJTs' keys
into one), ``from_jt_dict`` (JaggedTensors' features into one KJT) and ``empty_like``; and of
those that fill or keep a buffer: ``copy_`` (its checks and tensor copies) and
``record_stream``. Each function here is the method of the same name, whose docstring says
what it returns; the methods delegate, so the class file stays about what a KJT holds.

Imported by the class's module, never importing it: a KJT is built as ``type(kjt)(...)``, of
the class of the KJT given, or of the class passed in (``from_jt_dict``), and read through
its public methods only.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from jaggedrec.sparse._jagged import JaggedTensor


def from_jt_dict(cls: type, jt_dict: Dict[str, JaggedTensor]):
    keys = list(jt_dict)
    jts = list(jt_dict.values())
    strides = [jt.lengths().numel() for jt in jts]
    weighted = {jt.weights_or_none() is not None for jt in jts}
    if len(weighted) > 1:
        raise ValueError("from_jt_dict: either all features have weights or none do")
    weights = torch.cat([jt.weights() for jt in jts]) if weighted == {True} else None
    same = len(set(strides)) <= 1
    return cls(keys, torch.cat([jt.values() for jt in jts]), weights, lengths=torch.cat([jt.lengths() for jt in jts]),
               stride=(strides[0] if strides else 0) if same else None,
               stride_per_key_per_rank=None if same else [[s] for s in strides],
               length_per_key=[jt.values().size(0) for jt in jts])


def _vbe_rows(kjt, indices: Sequence[int]) -> Optional[torch.Tensor]:
    """``[len(indices), R]`` the VBE strides of those keys; None for a KJT that is not VBE."""
    spkpr = kjt.stride_per_key_per_rank_tensor()
    return None if spkpr is None else spkpr[list(indices)]


def _optional(t: Optional[torch.Tensor], fn) -> Optional[torch.Tensor]:
    return None if t is None else fn(t)


def permute(kjt, indices: List[int]):
    starts, length_per_key, keys = kjt.offset_per_key(), kjt.length_per_key(), kjt.keys()
    pieces = lambda t, at: [t[at[i]:at[i + 1]] for i in indices]  # noqa: E731
    # the stride as held, never derived here: a VBE KJT's is derived by whoever asks for it
    stride = kjt.stride_or_none()
    if not kjt.variable_stride_per_key():
        lengths = kjt.lengths().view(len(keys), stride)[list(indices)].reshape(-1)
        stride_per_key = None
    else:
        lengths = _cat_or_empty(pieces(kjt.lengths(), kjt.lengths_offset_per_key()), kjt.lengths())
        stride_per_key = [kjt.stride_per_key()[i] for i in indices]
    values = kjt.values()
    return type(kjt)(
        [keys[i] for i in indices], _cat_or_empty(pieces(values, starts), values),
        _optional(kjt.weights_or_none(), lambda w: _cat_or_empty(pieces(w, starts), w)),
        lengths=lengths, stride=stride, stride_per_key_per_rank=_vbe_rows(kjt, indices),
        stride_per_key=stride_per_key, length_per_key=[length_per_key[i] for i in indices])


def split(kjt, segments: Sequence[int]) -> list:
    keys = kjt.keys()
    if any(size < 0 for size in segments) or sum(segments) != len(keys):
        raise ValueError(f"split: segments {list(segments)} do not add up to {len(keys)} keys")
    if any(size == len(keys) for size in segments):
        # one part holds every key: it is the KJT itself (VBE inverse indices kept), the others empty
        return [kjt if size == len(keys) else _no_keys(kjt) for size in segments]
    out, first = [], 0
    starts, bag_starts = kjt.offset_per_key(), kjt.lengths_offset_per_key()
    lengths, stride = kjt.lengths().reshape(-1), kjt.stride()
    values, weights = kjt.values(), kjt.weights_or_none()
    for size in segments:
        last = first + size
        lo, hi = starts[first], starts[last]
        out.append(type(kjt)(
            keys[first:last], values[lo:hi], _optional(weights, lambda w: w[lo:hi]),
            lengths=lengths[bag_starts[first]:bag_starts[last]], stride=stride,
            stride_per_key_per_rank=_vbe_rows(kjt, range(first, last)),
            stride_per_key=kjt.stride_per_key()[first:last],
            length_per_key=kjt.length_per_key()[first:last]))
        first = last
    return out


def _no_keys(kjt):
    """A part of no keys of ``kjt``'s batch (and VBE ranks), with no ids nor bags."""
    spkpr = kjt.stride_per_key_per_rank_tensor()
    return type(kjt)([], kjt.values()[:0], _optional(kjt.weights_or_none(), lambda w: w[:0]),
                     lengths=kjt.lengths().reshape(-1)[:0], stride=kjt.stride(),
                     stride_per_key_per_rank=None if spkpr is None else spkpr[:0],
                     stride_per_key=[], length_per_key=[])


def _cat_or_empty(pieces: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(pieces) if pieces else like[:0]


def flatten_lengths(kjt):
    return type(kjt)(kjt.keys(), kjt.values(), kjt.weights_or_none(), lengths=kjt.lengths().reshape(-1),
                     stride=kjt.stride(), stride_per_key_per_rank=kjt.stride_per_key_per_rank_tensor(),
                     length_per_key=kjt.length_per_key())


def _check_copy(name: str, keys: List[str], mine: Optional[torch.Tensor], theirs: Optional[torch.Tensor]) -> None:
    if (mine is None) != (theirs is None):
        have, lack = ("this KJT", "the source") if theirs is None else ("the source", "this KJT")
        raise ValueError(f"copy_ (keys {keys}): {have} has {name} and {lack} has none")
    if mine is not None and mine.shape != theirs.shape:
        raise ValueError(f"copy_ (keys {keys}): {name} of shape {tuple(theirs.shape)} cannot be copied into "
                         f"{name} of shape {tuple(mine.shape)}")


def copy_tensors(kjt, other, non_blocking: bool) -> None:
    """The tensor half of ``copy_``: ``other``'s tensors into ``kjt``'s, after checking them all
    (a refused copy leaves ``kjt`` whole). What ``kjt`` holds is filled, from the source's own
    tensor or one derived from it: a buffer of lengths and offsets would otherwise keep stale
    offsets behind fresh lengths."""
    keys = kjt.keys()
    if other.keys() != keys:
        raise ValueError(f"copy_: the source's keys {other.keys()} are not this KJT's {keys}")
    pairs = [("values", kjt.values(), other.values()), ("weights", kjt.weights_or_none(), other.weights_or_none())]
    if kjt.lengths_or_none() is not None:
        pairs.append(("lengths", kjt.lengths_or_none(), other.lengths()))
    if kjt.offsets_or_none() is not None:
        pairs.append(("offsets", kjt.offsets_or_none(), other.offsets()))
    mine_inv, their_inv = kjt.inverse_indices_or_none(), other.inverse_indices_or_none()
    pairs.append(("inverse_indices", None if mine_inv is None else mine_inv[1],
                  None if their_inv is None else their_inv[1]))
    for name, mine, theirs in pairs:
        _check_copy(name, keys, mine, theirs)
    for _, mine, theirs in pairs:
        if mine is not None:
            mine.copy_(theirs, non_blocking=non_blocking)


def record_stream(kjt, stream) -> None:
    inverse = kjt.inverse_indices_or_none()
    for t in (kjt.values(), kjt.weights_or_none(), kjt.lengths_or_none(), kjt.offsets_or_none(),
              None if inverse is None else inverse[1]):
        # host memory is not the caching allocator's: nothing to keep alive for a stream
        if t is not None and t.device.type != "cpu":
            t.record_stream(stream)


# --- builders that torch.fx records as one node each (``torch.fx.wrap``): they iterate and branch
# on their arguments, which a traced graph cannot -------------------------------------------------

@torch.fx.wrap
def concat(kjt_list: list) -> object:
    if not kjt_list:
        raise ValueError("concat needs at least one KeyedJaggedTensor")
    weighted = {kjt.weights_or_none() is not None for kjt in kjt_list}
    if len(weighted) > 1:
        raise ValueError("concat: either all KJTs have weights or none do")
    vbe = {kjt.variable_stride_per_key() for kjt in kjt_list}
    if len(vbe) > 1:
        raise ValueError("concat: either all KJTs have variable batch per feature (VBE) or none do")
    stride, spkpr = None, None
    if vbe == {True}:
        spkpr = [row for kjt in kjt_list for row in kjt.stride_per_key_per_rank()]
    else:
        strides = {kjt.stride() for kjt in kjt_list}
        if len(strides) > 1:
            raise ValueError(f"concat: KJTs have different strides {sorted(strides)}")
        stride = strides.pop()
    inverses = [kjt.inverse_indices_or_none() for kjt in kjt_list]
    if any(inv is None for inv in inverses) and any(inv is not None for inv in inverses):
        raise ValueError("concat: either all KJTs have inverse_indices or none do")
    inverse = None
    if inverses[0] is not None:
        inverse = ([k for inv in inverses for k in inv[0]], torch.cat([inv[1] for inv in inverses]))
    return type(kjt_list[0])(
        [k for kjt in kjt_list for k in kjt.keys()],
        torch.cat([kjt.values() for kjt in kjt_list]),
        torch.cat([kjt.weights() for kjt in kjt_list]) if weighted == {True} else None,
        lengths=torch.cat([kjt.lengths().reshape(-1) for kjt in kjt_list]), stride=stride,
        stride_per_key_per_rank=spkpr, inverse_indices=inverse,
        length_per_key=[n for kjt in kjt_list for n in kjt.length_per_key()])


@torch.fx.wrap
def empty_like(kjt, device: Optional[torch.device]):
    vbe = kjt.variable_stride_per_key()
    stride = None if vbe else kjt.stride()
    spkpr = kjt.stride_per_key_per_rank_tensor() if vbe else None
    if device is None:
        empty = lambda t: None if t is None else t.new_empty(0)  # noqa: E731
        return type(kjt)([], empty(kjt.values()), empty(kjt.weights_or_none()),
                         lengths=kjt.lengths().new_empty(0), stride=stride, stride_per_key_per_rank=spkpr)
    like = lambda t: None if t is None else torch.empty_like(t, device=device)  # noqa: E731
    inverse = kjt.inverse_indices_or_none()
    return type(kjt)(
        kjt.keys(), like(kjt.values()), like(kjt.weights_or_none()), like(kjt.lengths_or_none()),
        like(kjt.offsets_or_none()), stride=stride, stride_per_key_per_rank=spkpr,
        stride_per_key=kjt.stride_per_key_or_none(), length_per_key=kjt.length_per_key_or_none(),
        offset_per_key=kjt.offset_per_key_or_none(),
        inverse_indices=None if inverse is None else (inverse[0], like(inverse[1])))
