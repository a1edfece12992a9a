"""``EmbeddingBagCollection``: TorchRec's module over flat, table-batched storage."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import batch as batch_reader
from . import validation
from .configs import EmbeddingBagConfig
from .fused_state import FusedOptimizerState
from .host_memory import advise_huge_pages, retain_freed_memory
from .keyed_jagged_tensor import KeyedJaggedTensor
from .keyed_tensor import KeyedTensor
from .optim import FusedOptimizer
from .ops import pooled as pooled_ops
from .ops import vbe
from .ops.pooled import BACKENDS, use_kernels
from .tables import TableLayout
from .bad_ids import BOUNDS_CHECKS, BadIdReport


class EmbeddingBag(nn.Module):
    """One table of a collection: a ``[rows, dim]`` view into the collection's flat storage.

    It owns no parameter. ``weight`` is a live view of the owner's flat tensor, so writes
    to it (``weight.data.copy_(...)``) reach the table, and the gradient flows to the flat
    parameter that optimizers see.
    """

    def __init__(self, owner: "EmbeddingBagCollection", table: int) -> None:
        super().__init__()
        # Held outside nn.Module's registry: the owner is not a submodule of its tables.
        self.__dict__["_owner"] = owner
        self._table = table
        slot = owner._layout.tables[table]
        self.num_embeddings, self.embedding_dim = slot.rows, slot.dim
        self.mode = "mean" if owner._layout.configs[table].pooling.value == "MEAN" else "sum"

    @property
    def weight(self) -> torch.Tensor:
        return self.__dict__["_owner"].table_weight(self._table)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode='{self.mode}'"


class EmbeddingBagCollection(nn.Module):
    """Pools each feature's ids through its table, for all tables at once.

    Args:
        tables: one ``EmbeddingBagConfig`` per table; names must be unique.
        is_weighted: the input KJTs carry per-id weights (``[N]`` floats).
        device: where to allocate; ``"meta"`` allocates nothing.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        sparse: give the flat weights sparse COO gradients, as ``nn.EmbeddingBag(sparse=True)``.
        validate: check each batch (lengths, id ranges) and raise a ``ValueError`` naming the
            feature. On GPU the check reads one flag to the host; set False on hot paths.
        bounds_check: what the Triton kernels do with ids outside their table, which they never
            read: "raise" a ``ValueError`` naming the feature (reads one flag to the host, unless
            ``validate`` already checked the batch), "clamp" (skip them, as zero rows, and warn
            one step later without waiting for the GPU), or "off" (trust the ids).
        deterministic: Triton backward with bit-identical weight gradients (sorts the ids);
            False uses atomics, faster but with run-to-run rounding differences.
        fused_optimizer: a ``jaggedrec.optim`` config (SGD, RowWiseAdagrad, Adam): each backward
            updates the touched rows in place and no weight gradient is made. Its state lives
            in buffers beside the weights, so ``state_dict()`` holds it.

    ``forward(kjt)`` returns a ``KeyedTensor`` of ``[B, sum(dims)]`` fp32 values whose keys are
    the tables' features in config order (``feature@table`` for a feature read by several
    tables), whatever the KJT's key order.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, backend: str = "auto", sparse: bool = False,
                 validate: bool = True, bounds_check: str = "raise", deterministic: bool = True,
                 fused_optimizer: Optional[FusedOptimizer] = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if bounds_check not in BOUNDS_CHECKS:
            raise ValueError(f"bounds_check must be one of {BOUNDS_CHECKS}, got {bounds_check!r}")
        self._bounds_check = bounds_check
        self._deterministic = deterministic
        self._bad_id_report = BadIdReport()
        for t in tables:
            if not isinstance(t, EmbeddingBagConfig):
                raise TypeError(f"tables must be EmbeddingBagConfig, got {type(t).__name__}")
        self._layout = TableLayout(tables)
        self._is_weighted = is_weighted
        self._backend = backend
        self._sparse = sparse
        self.validate = validate
        device = torch.device(device) if device is not None else None
        # ids the Triton kernels skipped inside compiled graphs (see check_skipped_ids)
        self.register_buffer("skipped_ids", torch.zeros(len(self._layout.features), dtype=torch.int64,
                                                        device=device), persistent=False)
        if fused_optimizer is not None:
            if not isinstance(fused_optimizer, FusedOptimizer):
                raise TypeError(f"fused_optimizer must be a jaggedrec.optim config, got {fused_optimizer!r}")
            if sparse:
                raise ValueError("sparse=True and a fused_optimizer exclude each other: the fused "
                                 "optimizer makes no gradient")
        # updated in place by a fused optimizer, which needs no gradient of them (see FusedOptimizerState)
        self.flat_weights = nn.ParameterDict({
            g.name: nn.Parameter(torch.empty(g.numel, dtype=g.dtype, device=device),
                                 requires_grad=fused_optimizer is None) for g in self._layout.groups})
        for flat in self.flat_weights.values():
            advise_huge_pages(flat)  # before reset_parameters first touches the pages
        self._fused = fused_optimizer
        self.fused_optimizer_state = FusedOptimizerState(self._layout, fused_optimizer, device)
        self.embedding_bags = nn.ModuleDict({
            slot.name: EmbeddingBag(self, t) for t, slot in enumerate(self._layout.tables)})
        self._embedding_names = self._layout.embedding_names
        self._length_per_embedding = self._layout.embedding_dims()
        self._feature_names = [list(c.feature_names) for c in self._layout.configs]
        self._column_runs = self._layout.column_runs()
        key_rows: Dict[str, int] = {}
        key_tables: Dict[str, List[str]] = {}
        for f in self._layout.features:
            table = self._layout.tables[f.table]
            key_rows[f.feature] = min(key_rows.get(f.feature, table.rows), table.rows)
            key_tables.setdefault(f.feature, []).append(table.name)
        self._spec = validation.FeatureSpec(key_rows, key_tables, is_weighted, type(self).__name__)
        # the KJT key each group's features read, and each output feature's (tuples: fx constants)
        self._group_features = tuple(tuple(self._layout.features[i].feature for i in g.features)
                                     for g in self._layout.groups)
        self._output_features = tuple(f for c in self._layout.configs for f in c.feature_names)
        self.register_state_dict_post_hook(_emit_table_weights)
        self.register_load_state_dict_pre_hook(_absorb_table_weights)
        if device is None or device.type != "meta":
            self.reset_parameters()
        if any(flat.device.type == "cpu" for flat in self.flat_weights.values()):
            retain_freed_memory()  # after the tables are allocated: they keep their own mappings

    # --- storage -----------------------------------------------------------------------
    def table_weight(self, table: int) -> torch.Tensor:
        """``[rows, dim]`` view of table ``table`` (config index) in its flat parameter."""
        slot = self._layout.tables[table]
        flat = self.flat_weights[self._layout.groups[slot.group].name]
        return flat.narrow(0, slot.offset, slot.rows * slot.dim).view(slot.rows, slot.dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every table: its config's ``init_fn``, else uniform in [min, max]."""
        for flat in self.flat_weights.values():
            if flat.device.type != "meta":
                flat.zero_()  # the alignment gaps between blocks stay zero
        for t, config in enumerate(self._layout.configs):
            view = self.table_weight(t)
            if view.device.type == "meta":
                continue
            if config.init_fn is not None:
                result = config.init_fn(view)
                if isinstance(result, torch.Tensor) and result.data_ptr() != view.data_ptr():
                    view.copy_(result)
            else:
                view.uniform_(config.weight_init_min, config.weight_init_max)
        self.fused_optimizer_state.reset()
        if self.skipped_ids.device.type != "meta":
            self.skipped_ids.zero_()

    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._fused

    @property
    def learning_rate(self) -> float:
        """The fused optimizer's learning rate; ``AttributeError`` without a fused optimizer (an
        attribute this collection lacks, for ``hasattr`` and ``getattr(..., default)``)."""
        if self._fused is None:
            raise AttributeError(f"{type(self).__name__} has no fused_optimizer, hence no learning_rate")
        return self.fused_optimizer_state.learning_rate()

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return next(iter(self.flat_weights.values())).device

    def set_learning_rate(self, lr: float) -> None:
        """Change the fused optimizer's learning rate; compiled graphs read it from a buffer
        and are not recompiled."""
        self.fused_optimizer_state.set_learning_rate(lr)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._layout.configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    # --- forward -----------------------------------------------------------------------
    def check_skipped_ids(self) -> None:
        """Report the ids that compiled forwards skipped since the last call, then reset.

        A compiled graph cannot stop to raise, so on the Triton path it only counts the ids
        outside their tables (they are read as zero rows). Call this now and then (it reads the
        counts from the device): ``bounds_check="raise"`` raises a ``ValueError`` naming the
        features, ``"clamp"`` warns.
        """
        counts = self.skipped_ids.clone()
        self.skipped_ids.zero_()
        if not bool(counts.any()):
            return
        names = self._kernel_feature_names()
        bad = {names[i]: int(n) for i, n in enumerate(counts.tolist()) if n}
        message = f"{type(self).__name__}: ids outside their table were skipped; count per feature: {bad}"
        if self._bounds_check == "raise":
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _kernel_feature_names(self) -> List[str]:
        """KJT key of each feature, in the order the kernels count them (group by group)."""
        return [self._layout.features[i].feature for g in self._layout.groups for i in g.features]

    def _report_bad_ids(self, features: KeyedJaggedTensor, bad_ids: List[torch.Tensor], checked: bool) -> None:
        """Act on the kernels' counts of skipped ids in eager mode."""
        counts = torch.cat(bad_ids)
        if self._bounds_check == "raise":
            if not checked and bool(counts.any()):
                validation.check_data(features, self._spec)  # words the error with feature, id and sample
                raise AssertionError("the kernels skipped ids that validation accepts")  # pragma: no cover
            return
        self._bad_id_report.push(counts, self._kernel_feature_names())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            features: KJT with keys ``K`` (any order, a superset of the configured features),
                ``[N]`` ids, ``[K*B]`` lengths or ``[K*B+1]`` offsets, and ``[N]`` weights when
                ``is_weighted``; or a VBE KJT (``stride_per_key_per_rank``, ``inverse_indices``),
                whose bags are pooled once each and then expanded to the batch.
        Returns:
            KeyedTensor with ``[B, sum(dims)]`` fp32 values.
        """
        # The module's own calls go through module attributes (batch_reader.read_batch, ...):
        # those are what torch.fx.wrap swaps for graph nodes while symbolic_trace runs.
        batch = batch_reader.read_batch(features, self._spec, self._group_features, self._output_features,
                                        self.validate)
        outputs, bad_ids = [], []
        for i, g in enumerate(self._layout.groups):
            pooled, bad = pooled_ops.run_pooled_embedding_bags(
                self.flat_weights[g.name], batch.values, batch.offsets, batch.weights, list(g.weight_offsets),
                list(g.rows), list(g.dims), batch.group_keys[i], list(g.pooling), batch.num_keys, self._backend,
                self._sparse, self._deterministic,
                self._fused.kind if self._fused is not None else 0, self.fused_optimizer_state.tensors(g.name))
            outputs.append(pooled)
            bad_ids.append(bad)
        if self._bounds_check != "off" and use_kernels(self._backend, self.skipped_ids.device):
            if torch.compiler.is_compiling() or isinstance(pooled, torch.fx.Proxy):
                # a graph cannot stop to raise: it counts, and check_skipped_ids() reports
                self.skipped_ids.add_(torch.cat(bad_ids))
            else:
                self._report_bad_ids(features, bad_ids, checked=self.validate)
        if len(outputs) == 1:
            pooled = outputs[0]
        else:  # tables of several dtypes: interleave their columns back into output order
            pooled = torch.cat([outputs[g].narrow(1, start, width) for g, start, width in self._column_runs], dim=1)
        pooled = vbe.expand_by_inverse_indices(pooled, batch.inverse_indices, self._length_per_embedding,
                                               batch.batch_size)
        return KeyedTensor(self._embedding_names, self._length_per_embedding, pooled)


# --- state_dict in TorchRec's format: one [rows, dim] entry per table ------------------------

def _emit_table_weights(module: EmbeddingBagCollection, state_dict, prefix: str, local_metadata) -> None:
    layout = module._layout
    flats = {g.name: state_dict.pop(f"{prefix}flat_weights.{g.name}") for g in layout.groups}
    for slot in layout.tables:
        flat = flats[layout.groups[slot.group].name]
        state_dict[f"{prefix}embedding_bags.{slot.name}.weight"] = (
            flat.narrow(0, slot.offset, slot.rows * slot.dim).view(slot.rows, slot.dim))


def _absorb_table_weights(module: EmbeddingBagCollection, state_dict, prefix: str, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs) -> None:
    """Copy ``embedding_bags.<table>.weight`` entries into the flat parameters, in place."""
    layout = module._layout
    with torch.no_grad():
        for t, slot in enumerate(layout.tables):
            key = f"{prefix}embedding_bags.{slot.name}.weight"
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if tuple(value.shape) != (slot.rows, slot.dim):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {(slot.rows, slot.dim)}.")
                continue
            target = module.table_weight(t)
            if target.device.type != "meta":
                target.copy_(value)
    for g in layout.groups:
        flat_key = f"{prefix}flat_weights.{g.name}"
        if flat_key not in state_dict:  # already loaded above; let the default loader copy it onto itself
            state_dict[flat_key] = module.flat_weights[g.name].detach()
