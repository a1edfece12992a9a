"""``TableCollection``: what the bag and sequence collections share, defined once.

``CollectionOptions``: how a collection runs (backend, checks, gradients, fused optimizer),
built from its constructor's arguments and read back as ``module.options``.

Flat storage (one parameter per dtype, laid out by ``TableLayout``), a live ``[rows, dim]``
view per table, TorchRec's per-table ``state_dict`` entries, the fused optimizer's state
and learning rate, the checks a batch gets, and what happens to the ids the kernels skip.
A subclass adds its forward and names its tables' ModuleDict (``embedding_bags`` or
``embeddings``, as in TorchRec).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Type

import torch
from torch import nn

from jaggedrec.modules import validation
from jaggedrec.modules.bad_ids import BOUNDS_CHECKS, BadIdReport
from jaggedrec.modules.embedding_configs import BaseEmbeddingConfig
from jaggedrec.modules.fused_state import FusedOptimizerState
from jaggedrec.ops.host_memory import advise_huge_pages, retain_freed_memory
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.ops.backends import BACKENDS, use_kernels
from jaggedrec.optim import FusedOptimizer
from jaggedrec.modules.table_layout import TableLayout


@dataclass(frozen=True)
class CollectionOptions:
    """How a collection runs: what its constructor's keyword arguments say (see
    ``EmbeddingBagCollection``). Other code (the sharders, ``quant.EmbeddingBagCollection.from_float``)
    reads them here to build a collection that runs alike.

    Attributes:
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        sparse: sparse COO gradients for the flat weights.
        validate: check each batch's data (lengths, id ranges), raising a ``ValueError`` that
            names the feature.
        bounds_check: what the Triton kernels do with ids outside their table: "raise",
            "clamp" or "off".
        deterministic: bit-identical Triton weight gradients (sorted ids), else atomics.
        fused_optimizer: a ``jaggedrec.optim`` config applied in the backward, or None.
    """

    backend: str = "auto"
    sparse: bool = False
    validate: bool = True
    bounds_check: str = "raise"
    deterministic: bool = True
    fused_optimizer: Optional[FusedOptimizer] = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.bounds_check not in BOUNDS_CHECKS:
            raise ValueError(f"bounds_check must be one of {BOUNDS_CHECKS}, got {self.bounds_check!r}")
        if self.fused_optimizer is not None:
            if not isinstance(self.fused_optimizer, FusedOptimizer):
                raise TypeError(f"fused_optimizer must be a jaggedrec.optim config, got {self.fused_optimizer!r}")
            if self.sparse:
                raise ValueError("sparse=True and a fused_optimizer exclude each other: the fused "
                                 "optimizer makes no gradient")


class TableView(nn.Module):
    """One table of a collection: a ``[rows, dim]`` view into the collection's flat storage.

    It owns no parameter. ``weight`` is a live view of the owner's flat tensor, so writes
    to it (``weight.data.copy_(...)``) reach the table, and the gradient flows to the flat
    parameter that optimizers see.
    """

    def __init__(self, owner: "TableCollection", table: int) -> None:
        super().__init__()
        # Held outside nn.Module's registry: the owner is not a submodule of its tables.
        self.__dict__["_owner"] = owner
        self._table = table
        slot = owner.layout.tables[table]
        self.num_embeddings, self.embedding_dim = slot.rows, slot.dim

    @property
    def weight(self) -> torch.Tensor:
        return self.__dict__["_owner"].table_weight(self._table)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class TableCollection(nn.Module):
    """Base of ``EmbeddingBagCollection`` and ``EmbeddingCollection`` (their docstrings give
    the arguments)."""

    config_type: Type[BaseEmbeddingConfig] = BaseEmbeddingConfig
    view_type: Type[TableView] = TableView
    views_name: str = "tables"  # the attribute holding the table views, and their state_dict prefix

    def __init__(self, tables: Sequence[BaseEmbeddingConfig], device: Optional[torch.device],
                 options: CollectionOptions, is_weighted: Optional[bool]) -> None:
        super().__init__()
        for t in tables:
            if not isinstance(t, self.config_type):
                raise TypeError(f"tables must be {self.config_type.__name__}, got {type(t).__name__}")
        self._options = options
        self._bad_id_report = BadIdReport()
        self._layout = TableLayout(tables)
        device = torch.device(device) if device is not None else None
        # ids the Triton kernels skipped inside compiled graphs (see check_skipped_ids)
        self.register_buffer("skipped_ids", torch.zeros(len(self._layout.features), dtype=torch.int64,
                                                        device=device), persistent=False)
        # updated in place by a fused optimizer, which needs no gradient of them (see FusedOptimizerState)
        self.flat_weights = nn.ParameterDict({
            g.name: nn.Parameter(torch.empty(g.numel, dtype=g.dtype, device=device),
                                 requires_grad=options.fused_optimizer is None) for g in self._layout.groups})
        for flat in self.flat_weights.values():
            advise_huge_pages(flat)  # before reset_parameters first touches the pages
        self.fused_optimizer_state = FusedOptimizerState(self._layout, options.fused_optimizer, device)
        setattr(self, self.views_name, nn.ModuleDict({
            slot.name: self.view_type(self, t) for t, slot in enumerate(self._layout.tables)}))
        key_rows: Dict[str, int] = {}
        key_tables: Dict[str, List[str]] = {}
        for f in self._layout.features:
            table = self._layout.tables[f.table]
            key_rows[f.feature] = min(key_rows.get(f.feature, table.rows), table.rows)
            key_tables.setdefault(f.feature, []).append(table.name)
        self._spec = validation.FeatureSpec(key_rows, key_tables, is_weighted, type(self).__name__)
        # the storage groups, and the KJT key of each output feature (tuples: fx constants)
        self._groups = tuple(self._layout.groups)
        self._output_features = tuple(f for c in self._layout.configs for f in c.feature_names)
        self.register_state_dict_post_hook(_emit_table_weights)
        self.register_load_state_dict_pre_hook(_absorb_table_weights)
        if device is None or device.type != "meta":
            self.reset_parameters()
        if any(flat.device.type == "cpu" for flat in self.flat_weights.values()):
            retain_freed_memory()  # after the tables are allocated: they keep their own mappings

    # --- what other code may read ----------------------------------------------------------
    @property
    def options(self) -> CollectionOptions:
        """The settings this collection runs with (frozen; ``validate`` can be switched)."""
        return self._options

    @property
    def validate(self) -> bool:
        return self._options.validate

    @validate.setter
    def validate(self, value: bool) -> None:
        self._options = dataclasses.replace(self._options, validate=value)

    @property
    def layout(self) -> TableLayout:
        """Where each table and feature lives; its ``embedding_names`` and ``embedding_dims()``
        are the output's keys and widths."""
        return self._layout

    @property
    def feature_spec(self) -> validation.FeatureSpec:
        """What the input checks know of the features this collection reads."""
        return self._spec

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
    def device(self) -> torch.device:
        """Where the tables live."""
        return next(iter(self.flat_weights.values())).device

    # --- fused optimizer ---------------------------------------------------------------
    @property
    def fused_optimizer(self) -> Optional[FusedOptimizer]:
        return self._options.fused_optimizer

    @property
    def learning_rate(self) -> float:
        """The fused optimizer's learning rate; ``AttributeError`` without a fused optimizer (an
        attribute this collection lacks, for ``hasattr`` and ``getattr(..., default)``)."""
        if self._options.fused_optimizer is None:
            raise AttributeError(f"{type(self).__name__} has no fused_optimizer, hence no learning_rate")
        return self.fused_optimizer_state.learning_rate()

    def set_learning_rate(self, lr: float) -> None:
        """Change the fused optimizer's learning rate; compiled graphs read it from a buffer
        and are not recompiled."""
        self.fused_optimizer_state.set_learning_rate(lr)

    def _optimizer_args(self, group: str):
        """The ops' ``optimizer`` and ``optimizer_state`` for one storage group."""
        fused = self._options.fused_optimizer
        return (fused.kind if fused is not None else 0), self.fused_optimizer_state.tensors(group)

    # --- ids the kernels skipped -------------------------------------------------------
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
        if self._options.bounds_check == "raise":
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _kernel_feature_names(self) -> List[str]:
        """KJT key of each feature, in the order the kernels count them (group by group)."""
        return [self._layout.features[i].feature for g in self._layout.groups for i in g.features]

    def _handle_bad_ids(self, features: KeyedJaggedTensor, bad_ids: List[torch.Tensor],
                        like: torch.Tensor) -> None:
        """Act on the kernels' ``[F]`` counts of skipped ids, one tensor per group (``like``:
        an output, which tells whether this is a compiled or traced graph)."""
        options = self._options
        if options.bounds_check == "off" or not use_kernels(options.backend, self.skipped_ids.device):
            return
        if torch.compiler.is_compiling() or isinstance(like, torch.fx.Proxy):
            # a graph cannot stop to raise: it counts, and check_skipped_ids() reports
            self.skipped_ids.add_(torch.cat(bad_ids))
            return
        counts = torch.cat(bad_ids)
        if options.bounds_check == "raise":
            if not options.validate and bool(counts.any()):
                validation.check_data(features, self._spec)  # words the error with feature, id and sample
                raise AssertionError("the kernels skipped ids that validation accepts")  # pragma: no cover
            return
        self._bad_id_report.push(counts, self._kernel_feature_names())


# --- state_dict in TorchRec's format: one [rows, dim] entry per table ------------------------

def _emit_table_weights(module: TableCollection, state_dict, prefix: str, local_metadata) -> None:
    layout = module.layout
    flats = {g.name: state_dict.pop(f"{prefix}flat_weights.{g.name}") for g in layout.groups}
    for slot in layout.tables:
        flat = flats[layout.groups[slot.group].name]
        state_dict[f"{prefix}{module.views_name}.{slot.name}.weight"] = (
            flat.narrow(0, slot.offset, slot.rows * slot.dim).view(slot.rows, slot.dim))


def _absorb_table_weights(module: TableCollection, state_dict, prefix: str, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs) -> None:
    """Copy ``<views_name>.<table>.weight`` entries into the flat parameters, in place."""
    layout = module.layout
    with torch.no_grad():
        for t, slot in enumerate(layout.tables):
            key = f"{prefix}{module.views_name}.{slot.name}.weight"
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
