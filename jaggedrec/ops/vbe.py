"""Variable batch per feature (VBE): pool each feature's distinct bags, then expand to the batch.

A VBE batch holds ``B_k`` bags for key ``k`` (``[sum(B_k)]`` lengths, key-major) and an
``[F, B]`` inverse index per output feature that says which of its key's bags each of the
``B`` samples reads. The pooling op takes ``[K*B'+1]`` offsets of one stride ``B'``, so:

1. :func:`vbe_offsets` spreads the bags over ``B' = max(B_k)`` slots per key; the slots past a
   key's ``B_k`` are empty bags, which cost the op no row reads;
2. the op pools that ``[B', sum(dims)]`` (every id read once, however many samples share it);
3. :func:`expand_by_inverse_indices` gathers each feature's rows into ``[B, sum(dims)]``.

Autograd runs step 3 backwards as an ``index_add`` (the gradients of samples that share a bag
are summed into it), so the op's backward and its fused optimizer steps see one gradient row per
distinct bag, as if the batch held only those. Step 3 is plain torch ops, the same for the torch
and Triton backends; it is one function so that a kernel which reads each output row's bag
through the inverse index (no gather pass) can replace it.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..jagged_tensor import lengths_to_offsets


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
    slot = torch.arange(lengths.numel(), device=lengths.device) + torch.repeat_interleave(
        gaps, torch.tensor(stride_per_key, device=lengths.device), output_size=lengths.numel())
    spread = lengths.new_zeros(num_keys * width).index_copy_(0, slot, lengths)
    return lengths_to_offsets(spread)


@torch.fx.wrap
def expand_by_inverse_indices(pooled: torch.Tensor, inverse_indices: Optional[List[Optional[torch.Tensor]]],
                              dims: List[int], batch_size: int) -> torch.Tensor:
    """Each feature's pooled bags expanded to the full batch; ``pooled`` itself when there are
    no inverse indices (every sample has its own bag).

    Args:
        pooled: ``[B', sum(dims)]`` one row per bag slot, features side by side.
        inverse_indices: per output feature, ``[B]`` int, the bag slot of each sample (in
            ``[0, B_k)`` of the feature's key), or None where sample ``b`` reads slot ``b``
            (its columns are taken as they are); or None for every feature.
        dims: ``[F]`` width of each feature's columns.
        batch_size: B.
    Returns:
        ``[B, sum(dims)]``: row ``b``, feature ``f`` is ``pooled[inverse_indices[f][b]]``'s columns of ``f``.
    """
    if inverse_indices is None:
        return pooled
    starts = [0]
    for d in dims:
        starts.append(starts[-1] + d)
    gathered = [None if inv is None else pooled.narrow(1, starts[f], dims[f]).index_select(0, inv.long())
                for f, inv in enumerate(inverse_indices)]
    if pooled.shape[0] == batch_size and any(g is None for g in gathered):
        # write the gathered features over their own columns: the features read in order (most
        # of them, typically) are then not copied at all. Autograd sends each gathered block's
        # gradient back through its gather (summing shared bags) and none through what it
        # overwrote; the op saves no output, so writing into its output is safe.
        for f, g in enumerate(gathered):
            if g is not None:
                pooled.narrow(1, starts[f], dims[f]).copy_(g)
        return pooled
    return torch.cat([pooled.narrow(1, starts[f], dims[f]).narrow(0, 0, batch_size) if g is None else g
                      for f, g in enumerate(gathered)], dim=1)
