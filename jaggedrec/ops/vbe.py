"""Variable batch per feature (VBE): each feature's distinct bags pooled once, read by many samples.

A VBE batch holds ``B_k`` bags for key ``k`` (``[sum(B_k)]`` lengths, key-major) and, per
feature, a ``[B]`` inverse index that says which of its key's bags each of the ``B`` samples
reads. The pooling op takes ``[K*B'+1]`` offsets of one stride ``B'``, so :func:`vbe_offsets`
spreads the bags over ``B' = max(B_k)`` slots per key (the slots past a key's ``B_k`` are empty
bags, which cost no row reads). The op is then given the ``[F, B]`` inverse indices and
returns ``[B, sum(dims)]``:

* on the Triton path, each output row reads its bag through the inverse index, in the one
  forward launch: no pooled ``[B', sum(dims)]`` is written and gathered again;
* on the torch path, the op pools the ``[B', sum(dims)]`` slots, then :func:`expand_rows`.

Backward, :func:`sum_shared_bags` sums the gradients of the samples that share a bag, so the
weight gradient and the fused optimizer steps see one gradient row per distinct bag, as if the
batch held only those; and :func:`ids_read` keeps a bag that no sample reads from counting as
touched.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from jaggedrec.sparse.jagged_tensor import lengths_to_offsets, repeat_counts
from jaggedrec.ops.feature_tables import FeatureTables


@torch.fx.wrap
def vbe_offsets(lengths: torch.Tensor, stride_per_key: List[int]) -> torch.Tensor:
    """VBE lengths spread to one stride, as the pooling op reads a batch.

    Args:
        lengths: ``[sum(B_k)]`` ids per bag, key-major (key ``k`` has ``stride_per_key[k]`` bags).
        stride_per_key: ``[K]`` the ``B_k``.
    Returns:
        ``[K*B'+1]`` offsets, ``B' = max(B_k)``: bag ``j`` of key ``k`` at slot ``k*B' + j``, the
        other slots empty.
    """
    num_keys = len(stride_per_key)
    width = max(stride_per_key) if num_keys else 0
    lengths = lengths.reshape(-1)
    if all(b == width for b in stride_per_key):
        return lengths_to_offsets(lengths)
    # slot of each bag: its index, moved up by the empty slots of the keys before it
    gaps = torch.tensor([k * width - sum(stride_per_key[:k]) for k in range(num_keys)], device=lengths.device)
    slot = torch.arange(lengths.numel(), device=lengths.device) + repeat_counts(
        gaps, torch.tensor(stride_per_key, device=lengths.device), output_size=lengths.numel())
    spread = lengths.new_zeros(num_keys * width).index_copy_(0, slot, lengths)
    return lengths_to_offsets(spread)


def expand_rows(pooled: torch.Tensor, inverse_indices: torch.Tensor, out_offsets: Sequence[int]) -> torch.Tensor:
    """The torch path's expansion: each feature's bag rows gathered to the full batch.

    Args:
        pooled: ``[B', total_dim]`` one row per bag slot, features side by side.
        inverse_indices: ``[F, B]`` int64, the bag slot each sample reads, per feature.
        out_offsets: ``[F+1]`` each feature's first column.
    Returns:
        ``[B, total_dim]``. A feature whose samples read their own slots in order (on CPU, found
        with one read) is narrowed rather than gathered, when the batch has ``B`` slots.
    """
    batch = inverse_indices.shape[1]
    identity = _in_order(inverse_indices, pooled.shape[0])
    parts = []
    for f in range(inverse_indices.shape[0]):
        columns = pooled.narrow(1, out_offsets[f], out_offsets[f + 1] - out_offsets[f])
        parts.append(columns.narrow(0, 0, batch) if identity[f] else columns.index_select(0, inverse_indices[f]))
    return torch.cat(parts, dim=1)


def sum_shared_bags(grad_out: torch.Tensor, inverse_indices: torch.Tensor, out_offsets: Sequence[int],
                    num_slots: int) -> torch.Tensor:
    """The expansion's backward: ``[B', total_dim]`` fp32, each slot's row the sum of the
    output-gradient rows of the samples that read it (zero for a slot nobody reads)."""
    identity = _in_order(inverse_indices, num_slots)
    if all(identity) and grad_out.shape[0] == num_slots:
        return grad_out.float()
    if any(identity) and grad_out.shape[0] == num_slots:
        # start from the gradient itself: the in-order features' columns are already their bags'
        grad = grad_out.float().clone()
    else:
        grad = grad_out.new_zeros((num_slots, grad_out.shape[1]), dtype=torch.float32)
    for f in range(inverse_indices.shape[0]):
        lo, width = out_offsets[f], out_offsets[f + 1] - out_offsets[f]
        rows = grad_out.narrow(1, lo, width).float()
        if identity[f]:
            if grad_out.shape[0] != num_slots:
                grad.narrow(1, lo, width).narrow(0, 0, rows.shape[0]).copy_(rows)
            continue
        target = grad.narrow(1, lo, width)
        if grad_out.shape[0] == num_slots and any(identity):
            target.zero_()
        target.index_add_(0, inverse_indices[f], rows)
    return grad


def ids_read(inverse_indices: Optional[torch.Tensor], tables: FeatureTables, offsets: torch.Tensor,
             num_ids: int) -> Optional[torch.Tensor]:
    """``[N]`` bool: the id's bag is read by some sample; None without inverse indices (all are).
    An unread bag's ids get no optimizer step (a lazy optimizer must not count them as
    touched), though the forward pooled them.

    Args:
        inverse_indices: ``[F, B]`` the bag slot each sample reads, per feature of ``tables``.
        offsets: ``[K*B'+1]`` the spread bags' offsets.
    """
    read = bags_read(inverse_indices, tables, offsets)
    if read is None:
        return None
    return repeat_counts(read, (offsets[1:] - offsets[:-1]).long(), output_size=num_ids)


def bags_read(inverse_indices: Optional[torch.Tensor], tables: FeatureTables,
              offsets: torch.Tensor) -> Optional[torch.Tensor]:
    """``[K*B']`` bool: some sample reads the bag (:func:`ids_read` per bag, for a kernel that
    walks the bags anyway); None without inverse indices."""
    if inverse_indices is None:
        return None
    width = (offsets.shape[0] - 1) // tables.num_keys
    read = torch.zeros(tables.num_keys * width, dtype=torch.bool, device=inverse_indices.device)
    bags = (torch.tensor(tables.keys, device=inverse_indices.device).unsqueeze(1) * width
            + inverse_indices).reshape(-1)
    read.index_fill_(0, bags, True)
    return read


def _in_order(inverse_indices: torch.Tensor, num_slots: int) -> List[bool]:
    """Per feature, whether sample ``b`` reads slot ``b`` for every ``b``: one read, on CPU
    eager only (a GPU would wait for it, where the gathers cost little)."""
    batch = inverse_indices.shape[1]
    if (inverse_indices.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(inverse_indices)
            or batch > num_slots or not batch):
        return [False] * inverse_indices.shape[0]
    return (inverse_indices == torch.arange(batch, device=inverse_indices.device)).all(dim=1).tolist()
