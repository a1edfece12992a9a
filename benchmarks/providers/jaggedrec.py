"""jaggedrec's own collections as providers: the bag collection on each backend, compiled,
and fed a VBE batch; the unpooled EmbeddingCollection for ``--module ec``. Each runs with its
default ``validate=True``, as a user's would."""

from __future__ import annotations

import inspect
from typing import List, Optional

import torch

import jaggedrec as jr

from ..workload import OPTIMIZERS, Workload
from .base import COMPILE_MAX_TABLES, LEARNING_RATE, EcProvider, Provider


def fused_optimizer(name: str):
    """The fused optimizer FBGEMM's EmbOptimType ``name`` (lower case) names, as TorchRec's
    ``fused_params`` map it, at the benchmark's learning rate and FBGEMM's defaults."""
    from jaggedrec.distributed.fused_params import fused_optimizer_from_params

    return fused_optimizer_from_params({"optimizer": name.upper(), "learning_rate": LEARNING_RATE})


def backend_skip_reason(backend: str, w: Workload) -> Optional[str]:
    """Why a jaggedrec collection on ``backend`` cannot be timed on ``w``'s device, or None."""
    if backend == "triton" and w.device != "cuda":
        return "Triton kernels need CUDA (on CPU only TRITON_INTERPRET=1 runs them, far too slow to time)"
    return None


class Jaggedrec(Provider):
    """jaggedrec's EmbeddingBagCollection with one backend, with its default ``validate=True``."""

    optimizers = OPTIMIZERS

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"jaggedrec[{backend}]"
        self.description = f"jaggedrec.EmbeddingBagCollection(backend={backend!r}), flat table-batched storage"

    def skip_reason(self, w):
        return backend_skip_reason(self.backend, w)

    def build(self, tables, w):
        self.mode, self.keys = w.mode, w.keys
        kwargs = {}
        if w.mode == "train":
            # Train as jaggedrec is meant to: the fused optimizer updates the touched rows inside
            # the backward, as FBGEMM's EXACT_SGD does. Older jaggedrec: sparse grads + SGD.
            if "fused_optimizer" in inspect.signature(jr.EmbeddingBagCollection).parameters:
                kwargs["fused_optimizer"] = fused_optimizer(w.optimizer)
                self.note = f"fused {type(kwargs['fused_optimizer']).__name__} inside backward (fused_optimizer=)"
            else:
                kwargs["sparse"] = True
                self.note = "sparse grads (sparse=True) + torch.optim.SGD"
        ebc = jr.EmbeddingBagCollection(w.table_configs(), is_weighted=w.weighted, device=w.device,
                                        backend=self.backend, **kwargs)
        loaded = ebc.load_state_dict({f"embedding_bags.t{t}.weight": table for t, table in enumerate(tables)},
                                     strict=False)
        # only the fused optimizer's state may be missing: it keeps its fresh init
        missing = [k for k in loaded.missing_keys if not k.startswith("fused_optimizer_state.")]
        if missing or loaded.unexpected_keys:
            raise RuntimeError(f"load_state_dict: missing {missing}, unexpected {loaded.unexpected_keys}")
        self.module = ebc
        if kwargs.get("sparse"):
            self.optimizer = torch.optim.SGD(ebc.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        return self.module(batch.jaggedrec_kjt(self.keys)).values()


class CompiledJaggedrec(Jaggedrec):
    """jaggedrec under ``torch.compile(fullgraph=True)``: forward, and in training the
    backward with the fused optimizer, compiled once for every batch (dynamic sizes)."""

    name = "jaggedrec_compiled"

    def __init__(self) -> None:
        super().__init__("auto")
        self.name = CompiledJaggedrec.name
        self.description = ("torch.compile(fullgraph=True) of jaggedrec.EmbeddingBagCollection (backend auto: "
                            "Triton on CUDA, the torch path on CPU)")

    def skip_reason(self, w):
        if w.tables > COMPILE_MAX_TABLES:
            return f"more than {COMPILE_MAX_TABLES} tables: compile time grows with every table"
        return None

    def build(self, tables, w):
        super().build(tables, w)
        module = self.module
        self._compiled = torch.compile(lambda kjt: module(kjt).values(), fullgraph=True)

    def forward(self, batch):
        return self._compiled(batch.jaggedrec_kjt(self.keys))


class JaggedrecVbe(Jaggedrec):
    """jaggedrec fed the variable-batch (VBE) form of a batch whose ``f0`` comes from
    ``vbe_users`` users: each user's bag is pooled once, then expanded to its samples."""

    def __init__(self) -> None:
        super().__init__("auto")
        self.name = "jaggedrec_vbe"
        self.description = ("jaggedrec.EmbeddingBagCollection (backend auto) on a VBE KJT: f0 deduplicated "
                            "per user (stride_per_key_per_rank, inverse_indices)")

    def skip_reason(self, w):
        if not w.vbe_users:
            return "needs a batch with a deduplicated feature (--vbe-users, or --preset vbe)"
        return None

    def forward(self, batch):
        return self.module(batch.vbe.jaggedrec_kjt(self.keys)).values()


def ec_table_configs(w: Workload) -> List[jr.EmbeddingConfig]:
    """The workload's tables as ``EmbeddingConfig``: table ``t{t}`` serves feature ``f{t}``."""
    data_type = {"fp32": jr.DataType.FP32, "fp16": jr.DataType.FP16, "bf16": jr.DataType.BF16}[w.dtype]
    return [jr.EmbeddingConfig(name=f"t{t}", embedding_dim=d, num_embeddings=w.num_embeddings,
                               feature_names=[f"f{t}"], data_type=data_type)
            for t, d in enumerate(w.table_dims)]


class JaggedrecEC(EcProvider):
    """jaggedrec's EmbeddingCollection with one backend, with its default ``validate=True``."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"jaggedrec[{backend}]"
        self.description = f"jaggedrec.EmbeddingCollection(backend={backend!r}): one gather per dtype"

    def skip_reason(self, w):
        return backend_skip_reason(self.backend, w)

    def build(self, tables, w):
        self.mode, self.keys = w.mode, w.keys
        fused = None
        if w.mode == "train":
            # as for the bag collection: the fused SGD updates the touched rows inside the backward
            from jaggedrec import optim

            fused = optim.SGD(lr=LEARNING_RATE)
            self.note = "fused SGD inside backward (fused_optimizer=optim.SGD)"
        ec = jr.EmbeddingCollection(ec_table_configs(w), device=w.device, backend=self.backend,
                                    fused_optimizer=fused)
        loaded = ec.load_state_dict({f"embeddings.t{t}.weight": table for t, table in enumerate(tables)},
                                    strict=False)
        missing = [k for k in loaded.missing_keys if not k.startswith("fused_optimizer_state.")]
        if missing or loaded.unexpected_keys:
            raise RuntimeError(f"load_state_dict: missing {missing}, unexpected {loaded.unexpected_keys}")
        self.module = ec

    def rows(self, batch):
        out = self.module(batch.jaggedrec_kjt(self.keys))
        return [out[k].values() for k in self.keys]
