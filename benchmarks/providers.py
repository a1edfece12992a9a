"""The implementations under test ("providers"), each built from the same reference tables.

Every provider turns the reference ``[rows, dim]`` tables into its own module, then runs
one step on a :class:`~.workload.Batch`:

- ``forward`` mode: the forward under ``torch.no_grad()`` (inference);
- ``backward`` mode: forward, then backward of the given ``[B, total_dim]`` output gradient
  into dense weight gradients;
- ``train`` mode: a training step with SGD (lr 0.01), sparse gradients where the provider
  has them.

``forward(batch)`` returns the ``[B, total_dim]`` pooled output (features ``f0, f1, ...``
side by side) that the runner compares against the ``nn.EmbeddingBag`` loop before timing.
A provider names why it can't run here in ``skip_reason`` instead of failing later.
TorchRec and FBGEMM live in ``peers.py``.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import jaggedrec as jr

from .workload import Batch, Workload

LEARNING_RATE = 0.01
# torch.compile of a loop unrolls one op per table; past this, compile time dwarfs the run.
_COMPILE_MAX_TABLES = 64


class Provider:
    """Base class: one implementation, set up for one workload."""

    name = ""
    description = ""
    # times the module's abs tolerance this provider's output may be off by: more than 1 for a
    # peer whose quantized rows round their own way (quant_providers.py)
    tolerance_factor = 1.0

    def __init__(self) -> None:
        self.module: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.mode = "forward"
        self.note = ""  # what this provider does differently in this mode, shown in reports

    def skip_reason(self, w: Workload) -> Optional[str]:
        """Why this provider can't run ``w`` here, or None."""
        return None

    def build(self, tables: Sequence[torch.Tensor], w: Workload) -> None:
        """Make ``self.module`` from ``tables`` (``[rows, dim]`` each, copied, not aliased)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """``[B, total_dim]`` pooled output (any float dtype)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> None:
        """One timed step of ``self.mode``."""
        if self.mode == "forward":
            with torch.no_grad():
                self.forward(batch)
            return
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.clear_grads()
        out = self.forward(batch)
        out.backward(batch.grad_out if out.dtype == torch.float32 else batch.grad_out.to(out.dtype))
        if self.mode == "train" and self.optimizer is not None:
            self.optimizer.step()

    def grad_params(self) -> List[torch.Tensor]:
        """Parameters that receive weight gradients in backward mode (for the gradient check)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def clear_grads(self) -> None:
        if self.module is not None:
            for p in self.module.parameters():
                p.grad = None

    def table_bytes(self) -> int:
        """Bytes of the provider's parameters and buffers (its tables as it stores them)."""
        return _storage_bytes([*self.module.parameters(), *self.module.buffers()])

    def state_bytes(self) -> int:
        """Bytes of the provider's parameters, buffers and optimizer state (each storage once)."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        if self.optimizer is not None:
            tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return _storage_bytes(tensors)

    def release(self) -> None:
        self.module = self.optimizer = None


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the storages under ``tensors``, each once (views share one)."""
    seen, total = set(), 0
    for t in tensors:
        # a wrapper subclass (TorchRec's UInt4Tensor) has no storage of its own: count what it wraps
        t = t.elem if torch.is_tensor(getattr(t, "elem", None)) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and t.device.type != "meta":
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def feature_slices(batch: Batch, num_features: int, batch_size: int, dtype: torch.dtype):
    """Per feature: ``[N_f]`` ids, ``[B+1]`` offsets from 0, ``[N_f]`` weights in ``dtype`` or None.

    The feature boundaries come from the batch's host-side ``key_offsets``, as a data loader
    can provide them, so the loop pays no device-to-host read: the strongest fair baseline.
    """
    ids, offsets, weights = [], [], []
    for f in range(num_features):
        first, last = batch.key_offsets[f], batch.key_offsets[f + 1]
        ids.append(batch.values[first:last])
        offsets.append(batch.offsets[f * batch_size:(f + 1) * batch_size + 1] - first)
        weights.append(None if batch.weights is None else batch.weights[first:last].to(dtype))
    return ids, offsets, weights


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
        if w.tables > _COMPILE_MAX_TABLES:
            return f"more than {_COMPILE_MAX_TABLES} tables: compile time grows with every unrolled table"
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


class Jaggedrec(Provider):
    """jaggedrec's EmbeddingBagCollection with one backend, with its default ``validate=True``."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"jaggedrec[{backend}]"
        self.description = f"jaggedrec.EmbeddingBagCollection(backend={backend!r}), flat table-batched storage"

    def skip_reason(self, w):
        if self.backend == "triton" and w.device != "cuda":
            return "Triton kernels need CUDA (on CPU only TRITON_INTERPRET=1 runs them, far too slow to time)"
        return None

    def build(self, tables, w):
        self.mode, self.keys = w.mode, w.keys
        kwargs = {}
        if w.mode == "train":
            # Train as jaggedrec is meant to: the fused optimizer updates the touched rows inside
            # the backward, as FBGEMM's EXACT_SGD does. Older jaggedrec: sparse grads + SGD.
            if "fused_optimizer" in inspect.signature(jr.EmbeddingBagCollection).parameters:
                from jaggedrec import optim

                kwargs["fused_optimizer"] = optim.SGD(lr=LEARNING_RATE)
                self.note = "fused SGD inside backward (fused_optimizer=optim.SGD)"
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
        if w.tables > _COMPILE_MAX_TABLES:
            return f"more than {_COMPILE_MAX_TABLES} tables: compile time grows with every table"
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


def all_providers() -> List[Provider]:
    """Every provider, in report order; the ``eb_loop`` baseline comes first."""
    from .peers import FbgemmTBE, TorchRecEBC

    return [EmbeddingBagLoop(), EmbeddingBagConcat(), CompiledEmbeddingBagLoop(), Jaggedrec("torch"),
            Jaggedrec("triton"), CompiledJaggedrec(), JaggedrecVbe(), TorchRecEBC(), FbgemmTBE()]


# --- the unpooled EmbeddingCollection (``--module ec``) ---------------------------------------


class EcProvider(Provider):
    """An unpooled lookup, set up for one workload. On an :class:`~.workload.EcBatch`:

    - ``rows(batch)``: per feature ``f0, f1, ...``, its ``[N_f, dim_f]`` rows (one per id);
    - ``forward(batch)``: those rows flattened and concatenated, ``[sum_f N_f * dim_f]``: what
      the runner checks against the ``nn.Embedding`` loop (mixed dims allow no one matrix).
      Only the checks call it, so its copy is never timed;
    - ``step(batch)``: as :meth:`Provider.step`, with ``rows`` and the per-feature gradients.
    """

    def rows(self, batch: Batch) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch):
        return torch.cat([r.reshape(-1) for r in self.rows(batch)])

    def step(self, batch: Batch) -> None:
        if self.mode == "forward":
            with torch.no_grad():
                self.rows(batch)
            return
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.clear_grads()
        outs = self.rows(batch)
        grads = batch.grads
        if outs and outs[0].dtype != grads[0].dtype:  # TorchRec's module upcasts fp16 rows to fp32
            grads = [g.to(outs[0].dtype) for g in grads]
        torch.autograd.backward(outs, grads)
        if self.mode == "train" and self.optimizer is not None:
            self.optimizer.step()


def ec_table_configs(w: Workload) -> List[jr.EmbeddingConfig]:
    """The workload's tables as ``EmbeddingConfig``: table ``t{t}`` serves feature ``f{t}``."""
    data_type = {"fp32": jr.DataType.FP32, "fp16": jr.DataType.FP16, "bf16": jr.DataType.BF16}[w.dtype]
    return [jr.EmbeddingConfig(name=f"t{t}", embedding_dim=d, num_embeddings=w.num_embeddings,
                               feature_names=[f"f{t}"], data_type=data_type)
            for t, d in enumerate(w.table_dims)]


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


class JaggedrecEC(EcProvider):
    """jaggedrec's EmbeddingCollection with one backend, with its default ``validate=True``."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"jaggedrec[{backend}]"
        self.description = f"jaggedrec.EmbeddingCollection(backend={backend!r}): one gather per dtype"

    def skip_reason(self, w):
        if self.backend == "triton" and w.device != "cuda":
            return "Triton kernels need CUDA (on CPU only TRITON_INTERPRET=1 runs them, far too slow to time)"
        return None

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


def ec_providers() -> List[Provider]:
    """Every provider of ``--module ec``, in report order; the ``embedding_loop`` baseline first."""
    from .peers import FbgemmInferenceTBENone, FbgemmTBENone, TorchRecEC

    return [EmbeddingLoop(), JaggedrecEC("torch"), JaggedrecEC("triton"), TorchRecEC(), FbgemmTBENone(),
            FbgemmInferenceTBENone()]
