"""The torch path of quantized embedding bags (CPU, and CUDA with ``backend="torch"``).

Rows are pooled by torch's own row-wise quantized embedding-bag ops
(``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` and the 4-bit one: FBGEMM's CPU
kernels, shipped with torch), which read a row's codes, scale and bias and sum in fp32.

Neighbouring features that read neighbouring keys through tables of one storage type and dim
form a *segment*, as on the sequence path: their ids are one slice of the KJT's values and
their bags one slice of its offsets. A segment of many features with few ids is pooled by one
call over its block of tables (the type's same-dim tables, side by side in its buffer), each id
shifted by its table's first row; otherwise by one call per feature on that table's own rows
(:func:`_split` weighs the two); a per-feature call gets the KJT's own offsets where torch's op
takes them (:func:`op_takes_unbased_offsets`: the 8-bit op; the first key's start at 0 anyway),
else offsets re-based to 0 (the 8-bit op then also takes all of the KJT's ids, so that a key
costs one slice and its call). The pieces are then put side by side by one ``cat``. When every
bag holds one id (one-hot features) each segment's ids are taken batch-major instead, so that
its one call returns ``[B, keys*D]`` columns in the output's layout: with one segment, the
output itself, with no copy at all.

The segments, their per-feature cuts, the row views and the block shifts are worked out once
per layout and kept (``quantized_plan.QuantPlan``): on a small batch they cost more than the
pooling's own glue.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from jaggedrec.ops import pooled_torch, quantized_rows
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8, FeatureTables
from jaggedrec.ops.quantized_plan import QuantPlan, Segment, plan_for
from jaggedrec.sparse.jagged_tensor import repeat_counts


_OPS = {STORAGE_INT8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
        STORAGE_INT4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets}


def _bag_sums(rows: torch.Tensor, seg: Segment, ids: torch.Tensor, bag_offsets: torch.Tensor,
              psw: Optional[torch.Tensor]) -> torch.Tensor:
    """``[n, D']`` fp32 bag sums (``D' >= D``: an odd INT4 dim's padding nibble may come along).

    Args:
        rows: ``[R, row_bytes]`` uint8; ids: ``[N]`` rows of it; bag_offsets: ``[n+1]`` from 0,
            in the ids' dtype; psw: ``[N]`` fp32 or None.
    """
    if seg.storage == STORAGE_FP16:
        table = rows.narrow(1, 0, 2 * seg.dim).view(torch.float16)
        return pooled_torch.pooled_rows(ids, table, bag_offsets, psw, False)
    if not (rows.is_cpu and seg.packed):
        # torch's ops need their exact CPU layout; padded rows (row_align > 1) are dequantized here
        return _dequantized_sums(rows, seg.storage, seg.dim, ids, bag_offsets, psw)
    op = _OPS[seg.storage]
    # args: scale_grad_by_freq, mode (0: sum), pruned_weights, per_sample_weights,
    # compressed_indices_mapping, include_last_offset
    return op(rows, ids, bag_offsets, False, 0, False, psw, None, True)


def _dequantized_sums(rows, storage, dim, ids, bag_offsets, psw) -> torch.Tensor:
    """``[n, dim]`` fp32 bag sums: the bags' rows gathered, dequantized, weighted, summed."""
    values = quantized_rows.dequantize_rows(rows.index_select(0, ids.long()), storage, dim)
    if psw is not None:
        values = values * psw.unsqueeze(1)
    positions = torch.arange(ids.shape[0], dtype=bag_offsets.dtype, device=ids.device)
    return torch.nn.functional.embedding_bag(positions, values, bag_offsets, mode="sum", include_last_offset=True)


_ARANGES: Dict[Tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    """``[n]`` 0, 1, ..., n-1 in ``like``'s dtype and device: a view of one kept tensor, grown as needed."""
    key = (like.dtype, like.device)
    kept = _ARANGES.get(key)
    if kept is None or kept.shape[0] < n:
        kept = _ARANGES[key] = torch.arange(max(n, 2 * (0 if kept is None else kept.shape[0])), dtype=like.dtype,
                                            device=like.device)
    return kept[:n]


class IdsOutOfRange(RuntimeError):
    """Ids outside their tables, found by :func:`quantized_forward` with ``check_ids``; the
    caller words the error (feature, id, sample)."""


def quantized_forward(buffers: Dict[int, torch.Tensor], values: torch.Tensor, offsets: torch.Tensor,
                      psw: Optional[torch.Tensor], tables: FeatureTables, starts: Optional[List[int]] = None,
                      check_ids: bool = False, one_per_bag: Optional[bool] = None,
                      plan: Optional[QuantPlan] = None) -> torch.Tensor:
    """``[B, sum(dims)]`` fp32 pooled bags of every feature.

    Args:
        buffers: storage type -> flat uint8 buffer of that type's tables.
        values: ``[N]`` ids, key-major; offsets: ``[K*B+1]`` bag starts, in the ids' dtype,
            both contiguous; psw: ``[N]`` fp32 contiguous, or None.
        starts: ``[K+1]`` host ints, the first id of each key (``offsets[::B]``), when the
            caller has read them already.
        check_ids: prove every id the features read lies in its own table, else raise
            (``RuntimeError``: :class:`IdsOutOfRange`, or torch's op's own). A call over one
            table's packed CPU rows needs no pass of its own: torch's op refuses ids outside the
            rows it is given (:func:`op_refuses_bad_ids`); ids shifted into a block of tables,
            and the other paths, are checked per table first.
        one_per_bag: whether every bag holds one id, when the caller knows (validated lengths
            tell it for free); None: found out here, with one pass over the offsets.
        plan: ``tables``' plan (``quantized_plan.QuantPlan``), when the caller keeps one.
    """
    num_keys = tables.num_keys
    batch = (offsets.shape[0] - 1) // num_keys
    if plan is None:
        plan = plan_for(tables)
    plan.check_buffers(buffers)
    segs = plan.segments
    if one_per_bag is None:
        one_per_bag = (values.shape[0] == num_keys * batch
                       and torch.equal(offsets, _arange(num_keys * batch + 1, offsets)))
    if one_per_bag:
        pieces = [_one_id_per_bag(plan, values, psw, seg, batch, check_ids) for seg in segs]
    else:
        if starts is None:
            starts = offsets[::batch].tolist()  # [K+1] first id of each key
        split, fixed = _split(plan, starts)
        steps = _direct_steps(plan, split) if fixed else None
        if steps is not None:
            pieces = _direct_pieces(plan, steps, values, offsets, psw, batch, starts)
            return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=1)
        in_place = [_reads_in_place(buffers, seg, starts) for seg in split]
        relative = None
        if sum(len(seg.keys) == 1 and not kept for seg, kept in zip(split, in_place)) > 2:
            # [K, B+1] each key's bag starts within its own ids, in one op (per key they would cost one each)
            relative = torch.sub(offsets.as_strided((num_keys, batch + 1), (batch, 1)),
                                 offsets.as_strided((num_keys, 1), (batch, 0)))
        pieces = [_pooled(plan, values, offsets, relative, psw, seg, batch, starts, check_ids, kept)
                  for seg, kept in zip(split, in_place)]
    # one copy into the output, as torch's cat moves columns fastest (~1.7x a strided copy per piece)
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=1)


@functools.lru_cache(maxsize=None)
def op_refuses_bad_ids(storage: int) -> bool:
    """Whether torch's CPU quantized embedding-bag op for ``storage`` (INT8, INT4) raises on an
    id outside the rows it is given, negative or past the end, for int32 and int64 ids, with and
    without per-id weights. FBGEMM's kernels do; asked once per process, so that a build of
    torch whose op does not check gets the explicit check instead."""
    if storage == STORAGE_FP16:
        return False
    rows = torch.zeros((2, quantized_rows.row_bytes(storage, 2)), dtype=torch.uint8)
    op = _OPS[storage]
    for dtype in (torch.int32, torch.int64):
        for bad in (2, -1):
            for psw in (None, torch.ones(2)):
                try:
                    op(rows, torch.tensor([0, bad], dtype=dtype), torch.tensor([0, 2], dtype=dtype), False, 0, False,
                       psw, None, True)
                except RuntimeError:
                    continue
                return False
    return True


@functools.lru_cache(maxsize=None)
def op_takes_unbased_offsets(storage: int) -> bool:
    """Whether torch's CPU quantized embedding-bag op for ``storage`` pools one key of a KJT
    from the KJT's own offsets (``[B+1]``, starting at the key's first id ``lo``, not at 0)
    and all of its ids and weights (``values``, ``[N]``), reading only the key's
    ``values[lo:hi]``: the same bags as on ids and offsets re-based to 0, ids after the key's
    (a bad one among them) left unread, and still refusing a bad id of the key. FBGEMM's
    8-bit kernel does (it starts each bag at its offset and reads up to the key's last
    offset); torch's 4-bit op starts at the first id it is given and wants the last offset at
    the ids' end, so it gets re-based offsets. Asked once per process, with a tiny batch, for
    int32 and int64 ids, with and without per-id weights."""
    if storage == STORAGE_FP16 or not op_refuses_bad_ids(storage):
        return False
    table = torch.linspace(-1.0, 1.0, 40).view(5, 8)
    pack = torch.ops.quantized.embedding_bag_byte_prepack if storage == STORAGE_INT8 else \
        torch.ops.quantized.embedding_bag_4bit_prepack
    rows = pack(table)  # [5, row_bytes] in the op's own layout
    op = _OPS[storage]
    for dtype in (torch.int32, torch.int64):
        values = torch.tensor([4, 0, 1, 2, 3, 4, 1, 9], dtype=dtype)  # the key: ids 1..6; 9 past the table
        offsets = torch.tensor([0, 1, 3, 3, 7, 8], dtype=dtype)  # the key's bags: 1, 2 (empty) and 3
        for psw in (None, torch.arange(8, dtype=torch.float32)):
            based = op(rows, values[1:7], offsets[1:5] - 1, False, 0, False, None if psw is None else psw[1:7],
                       None, True)
            try:
                unbased = op(rows, values, offsets[1:5], False, 0, False, psw, None, True)
            except RuntimeError:
                return False
            if not torch.equal(based, unbased):
                return False
            try:
                op(rows, values, offsets[4:6], False, 0, False, psw, None, True)  # bag {9}: must be refused
            except RuntimeError:
                continue
            return False
    return True


REBASED, FROM_ZERO, ALL_IDS = 0, 1, 2  # how a one-key segment's call gets its offsets and ids


def _reads_in_place(buffers: Dict[int, torch.Tensor], seg: Segment, starts: List[int]) -> int:
    """How the segment, one key, pools: ``ALL_IDS``, straight from the KJT's offsets and all
    its ids, where torch's op takes them as they are; ``FROM_ZERO``, the KJT's offsets and the
    ids up to the key's end, when the key's offsets start at 0; else ``REBASED`` (0)."""
    if len(seg.keys) != 1:
        return REBASED
    if seg.packed and buffers[seg.storage].is_cpu and op_takes_unbased_offsets(seg.storage):
        return ALL_IDS
    return FROM_ZERO if starts[seg.keys[0]] == 0 else REBASED


def _op_checks(seg: Segment, rows: torch.Tensor) -> bool:
    """Whether the call on ``rows`` (the segment's one table) refuses bad ids by itself."""
    return seg.one_table and seg.packed and rows.is_cpu and op_refuses_bad_ids(seg.storage)


def _check_ids(ids: torch.Tensor, seg: Segment, counts: Optional[List[int]]) -> None:
    """Raise :class:`IdsOutOfRange` unless each of ``ids`` (unshifted) lies in its own table.

    Args:
        ids: ``[N']`` the segment's ids, key by key (``counts`` ids each), or ``[keys, B]``
            one per bag; a one-table segment's, or ids whose tables all have the same rows,
            need no counts.
    """
    if ids.numel() == 0:
        return
    rows = seg.table_rows
    if seg.one_table or min(rows) == max(rows):
        low, high = torch.aminmax(ids)
        bad = int(low) < 0 or int(high) >= rows[0]
    else:
        limits = torch.tensor(rows, dtype=ids.dtype, device=ids.device)
        if ids.dim() == 2:
            limits = limits.unsqueeze(1)
        else:
            limits = repeat_counts(limits, torch.tensor(counts, device=ids.device), output_size=ids.shape[0])
        bad = bool(((ids < 0) | (ids >= limits)).any())
    if bad:
        raise IdsOutOfRange(f"ids outside their tables among features {list(seg.features)}")


def _pooled(plan: QuantPlan, values, offsets, relative, psw, seg: Segment, batch: int, starts: List[int],
            check_ids: bool = False, in_place: int = REBASED) -> torch.Tensor:
    """``[B, keys*D]`` the segment's output columns; ``in_place``: :func:`_reads_in_place`
    (``REBASED``: the offsets re-based, from ``relative``, ``[K, B+1]``, when given)."""
    first, count = seg.keys[0], len(seg.keys)
    lo, hi = starts[first], starts[first + count]
    if hi == lo:
        return values.new_zeros((batch, count * seg.dim), dtype=torch.float32)
    rows = plan.rows(seg)
    if count == 1 and seg.one_table:
        # no op that is not needed: each costs microseconds per feature and step
        if check_ids and not _op_checks(seg, rows):
            _check_ids(values[lo:hi], seg, None)
        if in_place == ALL_IDS:  # the KJT's own offsets (the key's bag starts, from lo), ids and weights
            ids, weights = values, psw
            bag_offsets = offsets[first * batch:(first + 1) * batch + 1]
        elif in_place == FROM_ZERO:  # the same, from 0 (lo = 0), and the ids up to the key's end
            ids, weights = values[:hi], None if psw is None else psw[:hi]
            bag_offsets = offsets[first * batch:(first + 1) * batch + 1]
        else:
            ids, weights = values[lo:hi], None if psw is None else psw[lo:hi]
            bag_offsets = relative[first] if relative is not None else \
                offsets[first * batch:(first + 1) * batch + 1] - lo
    else:
        ids, weights = values[lo:hi], None if psw is None else psw[lo:hi]
        if not seg.one_table:
            counts = [starts[k + 1] - starts[k] for k in seg.keys]
            if check_ids:
                _check_ids(ids, seg, counts)
            ids = ids + repeat_counts(plan.bases(seg, ids), torch.tensor(counts, device=ids.device),
                                      output_size=hi - lo)
        elif check_ids and not _op_checks(seg, rows):
            _check_ids(ids, seg, None)
        bag_offsets = offsets[first * batch:(first + count) * batch + 1] - lo
    sums = _bag_sums(rows, seg, ids, bag_offsets, weights)
    if count == 1 and not seg.mean[0]:
        return sums if sums.shape[1] == seg.dim else sums[:, :seg.dim]
    sums = sums.view(count, batch, -1)[:, :, :seg.dim]  # [keys, B, D], key-major
    if any(seg.mean):
        lengths = (bag_offsets[1:] - bag_offsets[:-1]).view(count, batch, 1).clamp(min=1).float()
        mean = torch.tensor(seg.mean, device=sums.device).view(count, 1, 1)
        sums = sums * torch.where(mean, 1.0 / lengths, 1.0)
    if count == 1:
        return sums[0]
    return sums.transpose(0, 1).reshape(batch, count * seg.dim)


# One call over a block of several tables first shifts every id by its table's first row (a
# repeat_interleave and an add), where one call per feature costs ~15 us of small ops more per
# feature. Fitted on a 2-core Xeon: the shift ~120 us plus ~2.6 ns an id while its [N] int64
# arrays fit in L2, and 3x that per id beyond, where one call per feature wins again (1000
# tables of 2.5k ids: 80 against 102 ms; 100 tables: 3.6 against 2.9 ms; 26 tables of 500
# ids: 1.04 against 0.81 ms; 10 tables of 2.5k ids: even).
_CALL_NS, _SHIFT_NS, _SHIFT_NS_PER_ID, _SHIFT_MAX_IDS = 15_000, 120_000, 2.6, 1 << 19


def _costs() -> Tuple[float, ...]:
    return _CALL_NS, _SHIFT_NS, _SHIFT_NS_PER_ID, _SHIFT_MAX_IDS  # module constants, which tests vary


def _split(plan: QuantPlan, starts: List[int]) -> Tuple[List[Segment], bool]:
    """The plan's segments, with those of several tables cut into one per feature where that is
    cheaper; and whether that cut is the plan's fixed one (the same for every batch, kept)."""
    costs = _costs()
    fixed = plan.splits.get(costs)
    if fixed is None:
        # no block call can pay when the calls it saves cost less than the shift's fixed part:
        # then the cut is the same for every batch, and kept
        fixed = plan.splits[costs] = [] if any(not seg.one_table and len(seg.keys) * _CALL_NS > _SHIFT_NS
                                               for seg in plan.segments) else \
            [s for seg, cut in zip(plan.segments, plan.cuts) for s in ((seg,) if seg.one_table else cut)]
    if fixed:
        return fixed, True
    out: List[Segment] = []
    for seg, cut in zip(plan.segments, plan.cuts):
        ids = starts[seg.keys[-1] + 1] - starts[seg.keys[0]]
        if seg.one_table or (ids <= _SHIFT_MAX_IDS and len(seg.keys) * _CALL_NS > _SHIFT_NS + _SHIFT_NS_PER_ID * ids):
            out.append(seg)
        else:
            out.extend(cut)
    return out, False


def _direct_steps(plan: QuantPlan, split: List[Segment]):
    """``[(key, segment, op, all_ids)]`` when every segment of a fixed cut is one key pooled by
    one SUM call on its table's packed CPU rows, whose op refuses bad ids by itself, and at most
    two keys need re-based offsets (more share one subtraction on the general path); else None.
    Kept per cut, buffer device and what the probes say: :func:`_direct_pieces` then pools with
    no per-call planning."""
    # the probes themselves in the key: tests swap them for others
    key = (id(split), plan.on_cpu, op_refuses_bad_ids, op_takes_unbased_offsets)
    steps = plan.direct.get(key, False)
    if steps is not False:
        return steps
    on_cpu, steps = plan.on_cpu, []
    for seg in split:
        if not (on_cpu and len(seg.keys) == 1 and seg.one_table and seg.packed and not seg.mean[0]
                and op_refuses_bad_ids(seg.storage)):
            steps = None
            break
        steps.append((seg.keys[0], seg, _OPS[seg.storage], op_takes_unbased_offsets(seg.storage)))
    if steps is not None and sum(not all_ids for *_, all_ids in steps) > 2:
        steps = None
    plan.direct[key] = steps
    return steps


def _direct_pieces(plan: QuantPlan, steps, values, offsets, psw, batch: int, starts: List[int]) -> List[torch.Tensor]:
    """``_pooled``'s pieces for :func:`_direct_steps`: per key, its offsets' slice and its call
    (a slice of the ids and a re-basing only where the op needs them)."""
    pieces = []
    for k, seg, op, all_ids in steps:
        lo, hi = starts[k], starts[k + 1]
        if hi == lo:
            pieces.append(values.new_zeros((batch, seg.dim), dtype=torch.float32))
            continue
        own = offsets[k * batch:(k + 1) * batch + 1]
        if all_ids:
            ids, weights = values, psw
        elif lo == 0:
            ids, weights = values[:hi], None if psw is None else psw[:hi]
        else:
            ids, weights, own = values[lo:hi], None if psw is None else psw[lo:hi], own - lo
        sums = op(plan.rows(seg), ids, own, False, 0, False, weights, None, True)
        pieces.append(sums if sums.shape[1] == seg.dim else sums[:, :seg.dim])
    return pieces


def _one_id_per_bag(plan: QuantPlan, values, psw, seg: Segment, batch: int, check_ids: bool = False) -> torch.Tensor:
    """``[B, keys*D]`` the segment's output columns when every bag holds one id: its row (times
    its weight; MEAN divides by 1). The ids are taken batch-major, so that the call returns
    the columns in the output's layout."""
    first, count = seg.keys[0], len(seg.keys)
    by_key = values[first * batch:(first + count) * batch].view(count, batch)
    rows = plan.rows(seg)
    if check_ids and not _op_checks(seg, rows):
        _check_ids(by_key, seg, None)
    ids = torch.empty((batch, count), dtype=values.dtype, device=values.device)
    if seg.one_table:
        ids.copy_(by_key.t())
    else:
        torch.add(by_key.t(), plan.bases(seg, values), out=ids)  # written once, in batch-major order
    weights = None
    if psw is not None:
        weights = psw[first * batch:(first + count) * batch].view(count, batch).t().contiguous().view(-1)
    sums = _bag_sums(rows, seg, ids.view(-1), _arange(batch * count + 1, ids), weights)
    if sums.shape[1] == seg.dim:
        return sums.view(batch, count * seg.dim)
    return sums.view(batch, count, -1)[:, :, :seg.dim].reshape(batch, count * seg.dim)
