"""The input dist: each rank's KJT of ``B`` bags in, this rank's local KJT of ``W * B`` bags out.

Every rank sends every other rank, for each of that rank's local features (``ShardLayout``),
its ``B`` bags: all of a feature's ids for a whole-row shard, or for a row-split shard only
the ids in the shard's rows, shifted to the shard's first row. Rank ``r`` lays the received
bags out source by source, so that bag ``s * B + b`` of a local feature is bag ``b`` of rank
``s``: the order the output dist sends rows back in.

Per-id weights that a module trains (a feature processor's, see ``fp_embeddingbag.py``) get
their gradient back along the same routing when the caller asks (``InFlight.wait(weights_grad=
True)``): ``WeightsDist`` runs the all-to-all in reverse with the same splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from jaggedrec.modules import validation
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, repeat_counts
from jaggedrec.distributed.comm import Agreement, joins_backward, start_agree, start_exchange
from jaggedrec.distributed.shard_layout import REPLICA, ShardLayout


@dataclass
class Routing:
    """Where one rank's ids went in a step: ``id_counts[r][j]``, how many of its ids it sent rank
    ``r`` for that rank's local feature ``j``; and per row-split ``(table, key)``, the order
    its ids were sent in, shard after shard (``ids[order]``)."""

    id_counts: List[List[int]]
    orders: Dict[Tuple[int, str], torch.Tensor]


class InputDist(nn.Module):
    """Routes one collection's features to the ranks holding their shards."""

    def __init__(self, layout: ShardLayout, rank: int, group, spec: validation.FeatureSpec,
                 is_weighted: bool) -> None:
        super().__init__()
        self._layout, self._rank, self._group = layout, rank, group
        self._spec, self._is_weighted = spec, is_weighted
        self._keys = layout.keys_needed()
        self._world = layout.world_size
        # row-split tables: each shard's first row, for the bucketization
        self._row_starts = {t: torch.tensor([s.row_offset for s in shards], dtype=torch.int64)
                            for t, shards in enumerate(layout.table_shards) if shards[0].row_split}
        self._local_keys = [local for local, _, _ in layout.local_features[rank]]
        # the weights' gradient sent back is d(own loss)/d(weight), as DDP expects of the dense
        # processors it averages: the output dist's backward divides by the world size, which a
        # replicated table's W copies undo when their gradients add up at the source, and which
        # the other kinds' single owner (or column shards adding up) undoes by this factor
        self._weight_grad_scales = [1.0 if shard.kind == REPLICA else float(self._world)
                                    for _, _, shard in layout.local_features[rank]]

    @property
    def owner(self) -> str:
        """The collection's name in error messages."""
        return self._spec.owner

    def extra_repr(self) -> str:
        return f"world_size={self._world}, rank={self._rank}, features={self._keys}"

    def forward(self, features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, int, Dict[str, torch.Tensor]]:
        """
        Args:
            features: this rank's KJT: ``B`` bags per key, keys in any order.
        Returns:
            the local KJT (this rank's local keys, ``W * B`` bags each), ``B``, and this
            rank's own ``[B]`` lengths per unsharded key (the MEAN tables' divisors).
        """
        local_kjt, b, own_lengths, _ = self.route(features)
        return local_kjt, b, own_lengths

    @property
    def keys(self) -> List[str]:
        """The features this dist routes (every key the sharded collection needs)."""
        return list(self._keys)

    def route(self, features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, int, Dict[str, torch.Tensor], "Routing"]:
        """``forward``, and where this rank's ids went (``Routing``), for an output dist that
        sends rows back per id."""
        return self.start(features).wait()

    def start(self, features: Optional[KeyedJaggedTensor], device: Optional[torch.device] = None,
              missing: str = "") -> "InFlight":
        """Check and route ``features`` here, launch the first collective (the ranks' agreement
        on the step) and return the dist in flight; ``InFlight.wait`` completes it. A rank
        without a KJT (``features`` None, ``missing`` saying why; ``device``: where the
        collectives take tensors) still takes part, so that every rank raises."""
        error: Optional[BaseException] = None
        sends, batch_size, own_lengths, routing = None, -1, {}, None
        try:
            if features is None:
                raise ValueError(f"{self._spec.owner}: {missing}")
            _check(features, self._spec)
            batch_size = features.stride()
            own_lengths, sends, routing = self._route(features, batch_size)
        except (ValueError, TypeError) as e:
            error = e
        counts = [0] * self._world if sends is None else [int(v.numel()) for v in sends[1]]
        device = features.values().device if features is not None else device
        agreement = start_agree(error, batch_size, counts, self._group, device)
        return InFlight(self, agreement, sends, counts, batch_size, own_lengths, routing)

    def launch(self, sends, counts: List[int], recv_counts: List[int], b: int):
        """The exchange of lengths, ids (and weights) launched: ``(received, works, sent
        weights)``; the sent weights (None when unweighted) keep their autograd history."""
        world, n_local = self._world, len(self._local_keys)
        lengths, values, weights = sends
        send_lengths = [b * len(self._layout.local_features[r]) for r in range(world)]
        parts = [(torch.cat(lengths), send_lengths, [b * n_local] * world),
                 (torch.cat(values), counts, recv_counts)]
        sent_weights = None
        if self._is_weighted:
            sent_weights = torch.cat(weights)
            parts.append((sent_weights.detach(), counts, recv_counts))
        received, works = start_exchange(parts, self._group)
        return received, works, sent_weights

    def weights_with_grad(self, sent: torch.Tensor, received: List[torch.Tensor], counts: List[int],
                          recv_counts: List[int]) -> torch.Tensor:
        """The received weights (``[sum(recv_counts)]``, source after source) as an output of
        ``WeightsDist``, whose backward sends their gradient back to ``sent`` (``[sum(counts)]``).
        Every rank must call it in a step where any does (it joins the backward's all-to-all
        even with nothing to send or receive)."""
        scales = self._weight_grad_scales
        if len(set(scales)) <= 1:
            scale: object = scales[0] if scales else 1.0
        else:  # per received id: its local feature's factor, blocks [source, feature]
            sizes = received[0].view(self._world, len(scales), -1).sum(-1).reshape(-1)
            per_feature = torch.tensor(scales, dtype=torch.float32, device=sizes.device).repeat(self._world)
            scale = repeat_counts(per_feature, sizes)
        return WeightsDist.apply(joins_backward([sent])[0], received[2], counts, recv_counts, scale, self._group)

    def finish(self, received: List[torch.Tensor], b: int) -> KeyedJaggedTensor:
        """The local KJT from the exchanged tensors."""
        return self._local_kjt(received, b, len(self._local_keys))

    def _route(self, kjt: KeyedJaggedTensor, b: int):
        """Per destination rank: the lengths, ids and weights it gets, its local features' in order."""
        index = kjt.index_per_key()
        starts, counts = kjt.offset_per_key(), kjt.length_per_key()
        all_lengths = kjt.lengths().view(-1)
        weights = kjt.weights_or_none()
        own: Dict[str, torch.Tensor] = {}
        per_key = {}
        for key in self._keys:
            k = index[key]
            ids = kjt.values().narrow(0, starts[k], counts[k]).long()
            w = weights.narrow(0, starts[k], counts[k]).float() if weights is not None else None
            lens = all_lengths.narrow(0, k * b, b).long()
            own[key] = lens
            per_key[key] = (lens, ids, w)
        buckets: Dict[Tuple[int, str], list] = {}
        orders: Dict[Tuple[int, str], torch.Tensor] = {}
        lengths_out, values_out, weights_out, id_counts = [], [], [], []
        for r in range(self._world):
            ls, vs, ws = [], [], []
            for _, key, shard in self._layout.local_features[r]:
                lens, ids, w = per_key[key]
                if shard.row_split:
                    if (shard.table, key) not in buckets:
                        buckets[(shard.table, key)], orders[(shard.table, key)] = self._bucketize(
                            shard.table, lens, ids, w, b)
                    lens, ids, w = buckets[(shard.table, key)][shard.index]
                ls.append(lens)
                vs.append(ids)
                if w is not None:
                    ws.append(w)
            id_counts.append([int(v.numel()) for v in vs])
            lengths_out.append(_cat(ls, torch.int64, all_lengths.device))
            values_out.append(_cat(vs, torch.int64, all_lengths.device))
            weights_out.append(_cat(ws, torch.float32, all_lengths.device))
        return own, (lengths_out, values_out, weights_out), Routing(id_counts, orders)

    def _bucketize(self, table: int, lens: torch.Tensor, ids: torch.Tensor, w: Optional[torch.Tensor], b: int):
        """One row-split table's bags cut per shard: ``[(lengths [B], ids shifted to the shard, weights)]``."""
        row_starts = self._row_starts[table].to(ids.device)
        n = row_starts.numel()
        shard_of = torch.searchsorted(row_starts[1:], ids, right=True)
        bag = repeat_counts(torch.arange(b, device=ids.device), lens)
        slot = shard_of * b + bag
        order = torch.argsort(slot, stable=True)  # ids keep their order within a bag
        per_slot = torch.bincount(slot, minlength=n * b).view(n, b)
        moved = ids[order] - row_starts[shard_of[order]]
        sizes = per_slot.sum(1).tolist()
        id_parts = torch.split(moved, sizes)
        w_parts = torch.split(w[order], sizes) if w is not None else [None] * n
        return [(per_slot[i], id_parts[i], w_parts[i]) for i in range(n)], order

    def _local_kjt(self, received: List[torch.Tensor], b: int, n_local: int) -> KeyedJaggedTensor:
        """Reorder the received ``[source, feature]`` blocks into ``[feature, source]``."""
        world = self._world
        lengths = received[0].view(world, n_local, b)
        values = received[1]
        weights = received[2] if self._is_weighted else None
        sizes = lengths.sum(-1)  # [source, feature] id counts
        src_start = (torch.cumsum(sizes.view(-1), 0) - sizes.view(-1)).view(world, n_local)
        dst_sizes = sizes.t().reshape(-1)
        dst_start = torch.cumsum(dst_sizes, 0) - dst_sizes
        gather = (repeat_counts(src_start.t().reshape(-1) - dst_start, dst_sizes)
                  + torch.arange(values.numel(), device=values.device))
        return KeyedJaggedTensor(self._local_keys, values[gather],
                                 weights[gather] if weights is not None else None,
                                 lengths=lengths.permute(1, 0, 2).reshape(-1), stride=world * b)


class InFlight:
    """One input dist on its way, in three steps that every rank takes in the same order:
    ``start`` launched the agreement; ``advance`` reads it and launches the exchange;
    ``wait`` completes the exchange and returns what ``InputDist.route`` returns. An error
    (this rank's bad batch, or another rank's) is kept and raised by ``wait``, so that a
    pipeline sending a batch ahead raises it in the step that runs the batch. ``drop``
    completes whatever was launched without raising (a dist nobody takes)."""

    def __init__(self, owner: "InputDist", agreement: Agreement, sends, counts: List[int], batch_size: int,
                 own_lengths: Dict[str, torch.Tensor], routing: Optional[Routing]) -> None:
        self._owner, self._agreement = owner, agreement
        self._sends, self._counts, self._b = sends, counts, batch_size
        self._own_lengths, self._routing = own_lengths, routing
        self._received: Optional[List[torch.Tensor]] = None
        self._sent_weights: Optional[torch.Tensor] = None
        self._recv_counts: List[int] = []
        self._works: list = []
        self._error: Optional[BaseException] = None
        # run once the output dist of this input is complete (set by a train pipeline)
        self.check: Optional[Callable[[], None]] = None

    @property
    def error(self) -> Optional[BaseException]:
        """The error ``wait`` will raise, once ``advance`` has run (None: none)."""
        return self._error

    def advance(self) -> None:
        """Read the agreement and launch the exchange (once; errors are kept for ``wait``)."""
        if self._agreement is None:
            return
        agreement, self._agreement = self._agreement, None
        try:
            recv_counts = agreement.wait(self._owner.owner)
        except (ValueError, TypeError) as e:  # BatchRejected is a ValueError
            self._error = e
            return
        self._recv_counts = recv_counts
        self._received, self._works, self._sent_weights = self._owner.launch(self._sends, self._counts, recv_counts,
                                                                             self._b)
        self._sends = None  # the exchange holds what it needs; free the staging buffers

    def wait(self, weights_grad: bool = False) -> Tuple[KeyedJaggedTensor, int, Dict[str, torch.Tensor], Routing]:
        """``weights_grad``: the local KJT's weights carry a backward to the sent weights (see
        ``InputDist.weights_with_grad``); decided alike on every rank (not from the batch)."""
        self.advance()
        self._complete()
        if self._error is not None:
            raise self._error
        self._record_stream()
        received = list(self._received)
        if weights_grad and torch.is_grad_enabled() and self._sent_weights is not None:
            received[2] = self._owner.weights_with_grad(self._sent_weights, received, self._counts,
                                                        self._recv_counts)
        self._sent_weights = None
        return self._owner.finish(received, self._b), self._b, self._own_lengths, self._routing

    def _record_stream(self) -> None:
        """On CUDA, a pipeline may have started this dist on its own stream: the caching
        allocator must not reuse the tensors handed over before the current stream is done."""
        handed = list(self._received) + list(self._own_lengths.values())
        if self._routing is not None:
            handed += list(self._routing.orders.values())
        current = None
        for t in handed:
            if t.is_cuda:
                current = current or torch.cuda.current_stream(t.device)
                t.record_stream(current)

    def drop(self) -> None:
        """Complete what was launched and forget the result."""
        self.advance()
        self._complete()
        self._received = self._sent_weights = None

    def _complete(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []


class WeightsDist(torch.autograd.Function):
    """``(sent [N_s], received [N_r], counts, recv_counts, scale, group) -> received``: the per-id
    weights the input dist's all-to-all already delivered (``sent``: this rank's, destination
    after destination, ``counts[r]`` to rank ``r``), made differentiable. The backward scales
    the received weights' gradient (a float, or one factor per received id) and sends it back
    by the all-to-all in reverse; duplicates of an id (column shards, replicas) add up at the
    source through ``sent``'s own history."""

    @staticmethod
    def forward(ctx, sent: torch.Tensor, received: torch.Tensor, counts: List[int], recv_counts: List[int],
                scale, group):
        ctx.splits, ctx.scale, ctx.group = (counts, recv_counts), scale, group
        ctx.sent_like = (sent.dtype, sent.device)
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad_received):
        counts, recv_counts = ctx.splits
        dtype, device = ctx.sent_like
        grad = grad_received * ctx.scale if grad_received is not None else torch.zeros(
            sum(recv_counts), dtype=dtype, device=device)
        grad_sent = grad.new_empty(sum(counts))
        torch.distributed.all_to_all_single(grad_sent, grad.contiguous(), counts, recv_counts, group=ctx.group)
        return grad_sent, None, None, None, None, None


def _check(kjt: KeyedJaggedTensor, spec: validation.FeatureSpec) -> None:
    """The unsharded module's checks, always on: an id outside its table must fail here, on
    its own rank, not in another rank's lookup."""
    if kjt.variable_stride_per_key():
        raise ValueError(f"{spec.owner}: a sharded collection takes one batch size for all features; "
                         f"variable-batch (VBE) KJTs are not supported when sharded")
    validation.key_indices(kjt.keys(), list(spec.key_rows), spec.owner)
    validation.check_static(kjt, spec)
    validation.check_data(kjt, spec)


def _cat(parts: List[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype, device=device)
