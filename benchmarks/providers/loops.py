"""The plain torch baselines: a loop of ``nn.EmbeddingBag`` (the bag collection's reference,
``eb_loop``), the loop compiled, one ``F.embedding_bag`` over concatenated tables, and for
``--module ec`` a loop of ``nn.Embedding`` (``embedding_loop``)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import COMPILE_MAX_TABLES, LEARNING_RATE, EcProvider, Provider, feature_slices


class _BagLoop(nn.Module):
    """``nn.EmbeddingBag`` per table; ``forward`` takes per-feature slices, returns ``[B, total_dim]``."""

    def __init__(self, tables: Sequence[torch.Tensor], sparse: bool) -> None:
        super().__init__()
        # _weight= adopts the copy as the parameter, skipping nn.EmbeddingBag's own init
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(t.shape[0], t.shape[1], mode="sum", sparse=sparse, include_last_offset=True,
                            _weight=t.clone()) for t in tables)

    def forward(self, ids: List[torch.Tensor], offsets: List[torch.Tensor],
                weights: List[Optional[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([bag(i, o, per_sample_weights=w) for bag, i, o, w in zip(self.bags, ids, offsets, weights)],
                         dim=1)


class EmbeddingBagLoop(Provider):
    name = "eb_loop"
    description = "one nn.EmbeddingBag per table, called in a Python loop (what TorchRec's unsharded EBC does)"

    def build(self, tables, w):
        self.mode, self.w = w.mode, w
        self.module = _BagLoop(tables, sparse=w.mode == "train")
        self._run = self.module
        if w.mode == "train":
            self.note = "sparse grads (nn.EmbeddingBag(sparse=True)) + torch.optim.SGD"
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        return self._run(*feature_slices(batch, self.w.tables, self.w.batch_size, self.w.torch_dtype))


class CompiledEmbeddingBagLoop(EmbeddingBagLoop):
    name = "eb_loop_compiled"
    description = "torch.compile of the nn.EmbeddingBag loop"

    def skip_reason(self, w):
        if w.device != "cuda":
            return "compiled only on CUDA (on CPU its compile time would dominate a short run)"
        if w.tables > COMPILE_MAX_TABLES:
            return f"more than {COMPILE_MAX_TABLES} tables: compile time grows with every unrolled table"
        return None

    def build(self, tables, w):
        super().build(tables, w)
        # dynamic: the number of ids per feature changes between batches; compile once, not per shape
        self._run = torch.compile(self.module, dynamic=True)


class EmbeddingBagConcat(Provider):
    name = "eb_concat"
    description = "one F.embedding_bag call over all tables concatenated into one [sum rows, dim] weight"

    def skip_reason(self, w):
        if len(set(w.table_dims)) > 1:
            return "needs one embedding dim for all tables (this workload mixes dims)"
        return None

    def build(self, tables, w):
        self.mode, self.w = w.mode, w
        self.sparse = w.mode == "train"
        self.module = nn.Module()
        self.module.weight = nn.Parameter(torch.cat(list(tables)))
        rows = torch.tensor([0] + [t.shape[0] for t in tables[:-1]], device=w.device).cumsum(0)
        self.module.register_buffer("row_base", rows)  # [T] first row of each table
        if w.mode == "train":
            self.note = "sparse grads (F.embedding_bag(sparse=True)) + torch.optim.SGD"
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        weight = self.module.weight
        # shift each feature's ids to its table's rows, then pool every (feature, sample) bag at once
        shift = torch.repeat_interleave(self.module.row_base, batch.key_counts, output_size=batch.values.numel())
        psw = None if batch.weights is None else batch.weights.to(weight.dtype)
        pooled = F.embedding_bag(batch.values + shift, weight, batch.offsets, mode="sum", sparse=self.sparse,
                                 per_sample_weights=psw, include_last_offset=True)  # [T*B, D]
        t, b, d = self.w.tables, self.w.batch_size, weight.shape[1]
        return pooled.view(t, b, d).transpose(0, 1).reshape(b, t * d)


class EmbeddingLoop(EcProvider):
    name = "embedding_loop"
    description = ("one nn.Embedding per table, called in a Python loop (what TorchRec's unsharded "
                   "EmbeddingCollection does)")

    def build(self, tables, w):
        self.mode, self.w = w.mode, w
        sparse = w.mode == "train"
        self.module = nn.ModuleList(nn.Embedding(t.shape[0], t.shape[1], sparse=sparse, _weight=t.clone())
                                    for t in tables)
        if w.mode == "train":
            self.note = "sparse grads (nn.Embedding(sparse=True)) + torch.optim.SGD"
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LEARNING_RATE)

    def rows(self, batch):
        # feature boundaries from the host, as for the bag loop: no device-to-host read
        bounds = batch.key_offsets
        return [table(batch.values[bounds[f]:bounds[f + 1]]) for f, table in enumerate(self.module)]
