"""The collectives a sharded collection runs, from ``torch.distributed`` only.

* ``agree_on_batch``: the first collective of every step. Each rank tells every other its
  status (did its batch pass the checks), its batch size and how many ids it will send.
  A rank whose batch was rejected still takes part, so a bad batch raises on every rank,
  with the bad rank's message, instead of leaving the others waiting in the next collective.
  ``start_agree`` launches it and ``Agreement.wait`` reads it, so a train pipeline can
  overlap it with other work.
* ``exchange``: uneven all-to-alls (lengths, ids, weights), launched together, then waited
  (``start_exchange``: launched only).
* ``PickupCheck``: whether every rank's module takes the input a train pipeline sent ahead.
* ``OutputDist``: the pooled rows' way back, one autograd function: an all-to-all for the
  exchanged columns, a reduce-scatter for the row-wise partial sums, and the replicas'
  local slice; launched asynchronously (``Pending.wait`` completes them). Its backward runs
  the transposed collectives in a fixed order on every rank and divides by the world size:
  the loss is the mean of the ranks' losses, as DDP's averaging makes it for dense weights.
* ``RowsOutputDist``: the same for the unpooled collection, whose rows go back per id.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_MESSAGE_BYTES = 1024


class BatchRejected(ValueError):
    """Another rank's batch failed the checks; the message is that rank's error."""


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group, async_op: bool):
    # reduce_scatter_single replaces reduce_scatter_tensor from torch 2.13 on
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def agree_on_batch(error: Optional[BaseException], batch_size: int, send_counts: Sequence[int], group,
                   owner: str, device: torch.device) -> List[int]:
    """Exchange status, batch size and id counts; return the id count each rank sends here.

    Raises on every rank when any rank's batch was rejected (``error`` there), or when the
    ranks' batch sizes differ. ``device``: where the group's collectives take tensors (CUDA for NCCL).
    """
    return start_agree(error, batch_size, send_counts, group, device).wait(owner)


class Agreement:
    """``agree_on_batch`` in flight: its all-to-all launched, ``wait`` reads the answer (and
    runs the error path's collective when a rank failed). Every rank must wait it."""

    def __init__(self, error: Optional[BaseException], batch_size: int, group, mine: torch.Tensor) -> None:
        self._error, self._batch_size, self._group = error, batch_size, group
        self._theirs = torch.empty_like(mine)
        self._work = dist.all_to_all_single(self._theirs, mine, group=group, async_op=True)

    def wait(self, owner: str) -> List[int]:
        group, error, batch_size = self._group, self._error, self._batch_size
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if self._work is not None:
            self._work.wait()
            self._work = None
        status, sizes, counts = self._theirs.unbind(1)
        device = self._theirs.device
        if bool(status.any()):
            text = f"{type(error).__name__}: {error}" if error is not None else ""
            buffer = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
            raw = text.encode()[:_MESSAGE_BYTES]
            if raw:
                buffer[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
            buffer = buffer.to(device)
            messages = torch.empty(world * _MESSAGE_BYTES, dtype=torch.uint8, device=device)
            all_gather(messages, buffer, group, async_op=False)
            if error is not None:
                raise error
            bad = [r for r in range(world) if status[r]]
            first = bytes(messages.view(world, _MESSAGE_BYTES)[bad[0]].cpu().tolist()).rstrip(b"\0").decode(
                errors="replace")
            raise BatchRejected(f"{owner}: rank {bad[0]} rejected its batch, so every rank stops this step "
                                f"(ranks {bad} failed): {first}")
        if bool((sizes != batch_size).any()):
            raise ValueError(f"{owner}: every rank must pass the same batch size in a step; ranks 0..{world - 1} "
                             f"passed {sizes.tolist()} (this is rank {rank})")
        return counts.tolist()


def start_agree(error: Optional[BaseException], batch_size: int, send_counts: Sequence[int], group,
                device: torch.device) -> Agreement:
    """Launch ``agree_on_batch``'s all-to-all; ``Agreement.wait(owner)`` finishes it."""
    mine = torch.tensor([[int(error is not None), batch_size, n] for n in send_counts], dtype=torch.int64,
                        device=device)
    return Agreement(error, batch_size, group, mine)


def exchange(sends: Sequence[Tuple[torch.Tensor, List[int], List[int]]], group) -> List[torch.Tensor]:
    """Uneven all-to-alls of ``(tensor, send splits, receive splits)`` along dim 0, launched
    together and then waited; returns the received tensors."""
    received, works = start_exchange(sends, group)
    for w in works:
        w.wait()
    return received


def start_exchange(sends: Sequence[Tuple[torch.Tensor, List[int], List[int]]],
                   group) -> Tuple[List[torch.Tensor], list]:
    """``exchange`` launched: the received tensors (complete once the works are waited) and the works."""
    received, works = [], []
    for tensor, send_splits, recv_splits in sends:
        out = tensor.new_empty((sum(recv_splits),) + tuple(tensor.shape[1:]))
        works.append(dist.all_to_all_single(out, tensor.contiguous(), recv_splits, send_splits, group=group,
                                            async_op=True))
        received.append(out)
    return received, works


class PickupCheck:
    """Whether every rank's sharded module takes the input dist a train pipeline sent ahead
    (``picked``): a small all-reduce, launched here. ``split()`` waits for it and says whether
    the ranks differ; ``raise_if_split()`` raises then, naming ``owner``. A rank that took the
    dist only needs the answer when it waits for its output dist (which every rank runs, see
    ``Prefetcher.take``), so the all-reduce runs beside its lookup and output dist."""

    def __init__(self, picked: bool, group, device: torch.device, owner: str) -> None:
        self._picked, self._group, self._owner = picked, group, owner
        self._flags = torch.tensor([int(picked), -int(picked)], dtype=torch.int64, device=device)
        self._work = dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=group, async_op=True)
        self._split: Optional[bool] = None

    def split(self) -> bool:
        if self._split is None:
            self._work.wait()
            self._split = int(self._flags[0]) != -int(self._flags[1])
        return self._split

    def raise_if_split(self) -> None:
        if self.split():
            raise RuntimeError(f"{self._owner}: some ranks received the KeyedJaggedTensor the train pipeline "
                               f"distributed ahead and others a different one (rank {dist.get_rank(self._group)} "
                               f"{'did' if self._picked else 'did not'}); a model must change its KJTs the same "
                               f"way on every rank")


class Pending:
    """The output dist's collectives still in flight (filled by ``OutputDist.forward``);
    ``check``: called once they are complete (a train pipeline's ``PickupCheck``)."""

    def __init__(self, check: Optional[Callable[[], None]] = None) -> None:
        self.works: list = []
        self._check = check

    def wait(self) -> None:
        # torch 2.13's reduce_scatter_single copies its result into the output when waited:
        # recorded by autograd, that copy would cut the output off from OutputDist's backward
        with torch.no_grad():
            for w in self.works:
                w.wait()
        self.works = []
        check, self._check = self._check, None
        if check is not None:
            check()


def output_dist(exchange_rows: torch.Tensor, reduce_rows: torch.Tensor, replica_rows: torch.Tensor,
                exchange_widths: List[int], batch_size: int, group, pending: Pending):
    """``OutputDist`` on every rank, whatever it holds (see ``joins_backward``)."""
    return OutputDist.apply(*joins_backward([exchange_rows, reduce_rows, replica_rows]), exchange_widths,
                            batch_size, group, pending)


def rows_output_dist(sent: torch.Tensor, replica: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                     replica_splits: List[int], kinds: Tuple[bool, bool], group, pending: Pending):
    """``RowsOutputDist`` on every rank, whatever it holds (see ``joins_backward``)."""
    return RowsOutputDist.apply(*joins_backward([sent, replica]), send_splits, recv_splits, replica_splits, kinds,
                                group, pending)


def joins_backward(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``tensors``, the first made a leaf that requires grad when none does and grad is on.

    An output dist's backward runs collectives that every rank must enter. A rank whose rows
    need no gradient (it holds no shard, or its rows come from an empty block) would otherwise
    get outputs that do not require grad, skip the backward, and leave the other ranks waiting
    in it; with the stand-in its backward runs and sends its zero share like any other rank's.
    """
    tensors = list(tensors)
    if torch.is_grad_enabled() and not any(t.requires_grad for t in tensors):
        tensors[0] = tensors[0].detach().requires_grad_()
    return tensors


def tie_backward(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``rows``, with ``other`` joined to its backward (``other`` gets a zero gradient there).

    Per-id weights whose gradient goes back through a collective (``input_dist.WeightsDist``)
    must reach the loss on every rank, also where no lookup reads them (a rank without shards);
    tied to the output dist's input, their backward runs after the output dist's everywhere."""
    return _Tie.apply(rows, other)


class _Tie(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, other: torch.Tensor):
        ctx.other = (other.shape, other.dtype, other.device)
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.other
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class OutputDist(torch.autograd.Function):
    """``(exchange [W*B, Dx], reduce [W*B, Dr], replica [W*B, Dp])`` pooled for the global batch
    -> ``(received [sum_r B*Dx_r], reduced [B, Dr], own replica rows [B, Dp])`` for this rank's
    bags. ``exchange_widths[r]`` is rank r's ``Dx``; every rank knows them all."""

    @staticmethod
    def forward(ctx, exchange_rows: torch.Tensor, reduce_rows: torch.Tensor, replica_rows: torch.Tensor,
                exchange_widths: List[int], batch_size: int, group, pending: Pending):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b = batch_size
        ctx.group, ctx.b, ctx.widths, ctx.world = group, b, exchange_widths, world
        ctx.shapes = (exchange_rows.shape, reduce_rows.shape, replica_rows.shape)
        received = exchange_rows.new_empty(b * sum(exchange_widths))
        if any(exchange_widths):
            pending.works.append(dist.all_to_all_single(
                received, exchange_rows.contiguous().view(-1), [b * w for w in exchange_widths],
                [b * exchange_widths[rank]] * world, group=group, async_op=True))
        reduced = reduce_rows.new_empty(b, reduce_rows.shape[1])
        if reduce_rows.shape[1]:
            pending.works.append(reduce_scatter(reduced, reduce_rows.contiguous(), group, async_op=True))
        own = replica_rows.narrow(0, rank * b, b).clone()
        return received, reduced, own

    @staticmethod
    def backward(ctx, grad_received, grad_reduced, grad_own):
        group, b, widths, world = ctx.group, ctx.b, ctx.widths, ctx.world
        rank = dist.get_rank(group)
        x_shape, r_shape, p_shape = ctx.shapes
        scale = 1.0 / world
        # the collectives write every element of their outputs: no zero fills
        grad_x = (torch.empty if any(widths) else torch.zeros)(
            x_shape, dtype=grad_received.dtype if grad_received is not None else torch.float32)
        grad_x = _on(grad_x, grad_received, grad_reduced, grad_own)
        if any(widths):
            g = grad_received if grad_received is not None else grad_x.new_zeros(b * sum(widths))
            dist.all_to_all_single(grad_x.view(-1), g.contiguous(), [b * widths[rank]] * world,
                                   [b * w for w in widths], group=group)
            grad_x.mul_(scale)
        grad_r = grad_x.new_empty(r_shape) if r_shape[1] else grad_x.new_zeros(r_shape)
        if r_shape[1]:
            g = grad_reduced if grad_reduced is not None else grad_x.new_zeros(b, r_shape[1])
            all_gather(grad_r, g.contiguous(), group, async_op=False)
            grad_r.mul_(scale)
        grad_p = grad_x.new_empty(p_shape) if p_shape[1] else grad_x.new_zeros(p_shape)
        if p_shape[1]:
            g = grad_own if grad_own is not None else grad_x.new_zeros(b, p_shape[1])
            all_gather(grad_p, g.contiguous(), group, async_op=False)
            grad_p.mul_(scale)
        return grad_x, grad_r, grad_p, None, None, None, None


class RowsOutputDist(torch.autograd.Function):
    """The unpooled collection's way back: rows per id instead of pooled bags.

    ``sent`` (fp32, flat): the rows this rank looked up for each source rank's ids, source
    after source (``send_splits`` elements each) -> ``received`` (flat, ``recv_splits`` from
    each rank): the rows of this rank's own ids. ``replica`` (flat): the replicas' rows for
    every rank's ids, source after source (``replica_splits``) -> this rank's own block. The
    backward sends the rows' gradients back to where they were looked up (each replica gets
    every rank's block, so the copies take the same step), divided by the world size as in
    ``OutputDist``. ``kinds``: whether the plan has (exchanged or row-split, replicated)
    tables; the same on every rank, it decides which collectives run, so that none waits
    alone."""

    @staticmethod
    def forward(ctx, sent: torch.Tensor, replica: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                replica_splits: List[int], kinds: Tuple[bool, bool], group, pending: Pending):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.group, ctx.world, ctx.kinds = group, world, kinds
        ctx.splits = (send_splits, recv_splits, replica_splits)
        received = sent.new_empty(sum(recv_splits))
        if kinds[0]:
            pending.works.append(dist.all_to_all_single(received, sent.contiguous(), recv_splits, send_splits,
                                                        group=group, async_op=True))
        start = sum(replica_splits[:rank])
        return received, replica.narrow(0, start, replica_splits[rank]).clone()

    @staticmethod
    def backward(ctx, grad_received, grad_own):
        (send_splits, recv_splits, replica_splits), group, world = ctx.splits, ctx.group, ctx.world
        rank = dist.get_rank(group)
        like = grad_received if grad_received is not None else grad_own
        grad_sent = like.new_zeros(sum(send_splits))
        if ctx.kinds[0]:
            g = grad_received if grad_received is not None else like.new_zeros(sum(recv_splits))
            dist.all_to_all_single(grad_sent, g.contiguous(), send_splits, recv_splits, group=group)
            grad_sent.mul_(1.0 / world)
        grad_replica = like.new_zeros(sum(replica_splits))
        if ctx.kinds[1]:
            own = grad_own if grad_own is not None else like.new_zeros(replica_splits[rank])
            dist.all_to_all_single(grad_replica, own.contiguous().repeat(world), replica_splits,
                                   [replica_splits[rank]] * world, group=group)
            grad_replica.mul_(1.0 / world)
        return grad_sent, grad_replica, None, None, None, None, None, None


def _on(like: torch.Tensor, *grads) -> torch.Tensor:
    """``like`` moved to the device of the first gradient given."""
    for g in grads:
        if g is not None:
            return like.to(g.device)
    return like
