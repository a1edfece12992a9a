"""The arguments that travel together below the ops' flat schemas.

torch.library needs each op's arguments flat (tensors, ints, int lists). Below the schema the
batch's tensors and a fused step's arguments always go together, so they go as one object
each: :class:`OpBatch` (made by ``backends.batch_inputs``) and :class:`FusedStep`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class OpBatch(NamedTuple):
    """A KJT's batch as the ops read it: dense 1-D tensors (see ``backends.batch_inputs``)."""

    values: torch.Tensor  # [N] int32/int64 ids, key-major as in a KJT
    offsets: torch.Tensor  # [K*B'+1] int32/int64 bag starts, key-major: B' bags (slots) per key
    per_sample_weights: Optional[torch.Tensor] = None  # [N] float per-id weights, or None
    # VBE (see vbe.py): [F, B] int64, the bag slot of its key that sample b of feature f reads;
    # None where every sample reads its own bag (B = B')
    inverse_indices: Optional[torch.Tensor] = None

    @property
    def num_ids(self) -> int:
        return self.values.shape[0]

    def bags_per_key(self, num_keys: int) -> int:
        """B', read from the offsets' shape (never from device data)."""
        return (self.offsets.shape[0] - 1) // num_keys


class FusedStep(NamedTuple):
    """One fused optimizer step, as the ``*_fused_update`` ops take it flat."""

    # 1 SGD, 2 row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD), 3 lazy Adam, 4 exact Adagrad,
    # 5 LARS-SGD, 6 partial row-wise Adam (see kernels/pooled_fused.py)
    optimizer: int
    # [5] fp32 lr, eps, weight_decay, beta1, beta2: a tensor, so that a new learning rate
    # needs no recompilation
    hparams: torch.Tensor
    step: torch.Tensor    # [1] int64 steps taken; the update increments it first
    # row-wise Adagrad [R] (R: rows of all tables); the others' first state [W] (Adam's first moments)
    state1: torch.Tensor
    # Adam [W] second moments, partial row-wise Adam [R]; unused states may be empty
    state2: torch.Tensor
