"""``TableCollection``: what every embedding collection shares, defined once: the float bag
and sequence collections (``embedding_modules.py``) and the quantized bag collection
(``jaggedrec.quant``).

Defined here for all of them: the settings (``CollectionOptions``, read back as
``module.options``), the table layout (``TableLayout``: configs, names, feature bookkeeping),
a live view per table, TorchRec's per-table ``state_dict`` entries, the checks a batch gets
(the ``FeatureSpec``) and what happens to the ids the kernels skip. What varies is storage: a
subclass allocates its flat tensors and says which holds a table (the ``_allocate``,
``_storage``, ``_storage_key`` and ``_entry_error`` hooks), and adds its forward.
``FloatTableCollection`` stores float tables (one flat parameter per dtype) and trains them,
with a fused optimizer if asked.
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
from jaggedrec.modules.table_layout import TableLayout, TableSlot
from jaggedrec.ops.backends import BACKENDS, use_kernels
from jaggedrec.ops.host_memory import advise_huge_pages, retain_freed_memory
from jaggedrec.optim import FusedOptimizer
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor


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
    """One table of a collection: a ``[rows, stride]`` view into the collection's flat storage
    (``[rows, dim]`` for float tables).

    It owns no tensor. ``weight`` is a live view of the owner's flat tensor, so writes to it
    (``weight.data.copy_(...)``) reach the table, and the gradient flows to the flat
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
    """Base of every collection (the subclasses' docstrings give the arguments).

    Args:
        layout: the tables' layout, built by the subclass for its storage.
        options: the settings.
        is_weighted: whether KJTs carry per-id weights (None: weights are ignored).
        device: where the tables live.
    """

    config_type: Type[BaseEmbeddingConfig] = BaseEmbeddingConfig
    view_type: Type[TableView] = TableView
    views_name: str = "tables"  # the attribute holding the table views, and their state_dict prefix

    def __init__(self, layout: TableLayout, options: CollectionOptions, is_weighted: Optional[bool],
                 device: Optional[torch.device]) -> None:
        super().__init__()
        self._options = options
        self._bad_id_report = BadIdReport()
        self._layout = layout
        self._allocate(device)
        # ids the Triton kernels skipped inside compiled graphs (see check_skipped_ids)
        self.register_buffer("skipped_ids", torch.zeros(len(layout.features), dtype=torch.int64, device=device),
                             persistent=False)
        setattr(self, self.views_name, nn.ModuleDict({
            slot.name: self.view_type(self, t) for t, slot in enumerate(layout.tables)}))
        key_rows: Dict[str, int] = {}
        key_tables: Dict[str, List[str]] = {}
        for f in layout.features:
            table = layout.tables[f.table]
            key_rows[f.feature] = min(key_rows.get(f.feature, table.rows), table.rows)
            key_tables.setdefault(f.feature, []).append(table.name)
        self._spec = validation.FeatureSpec(key_rows, key_tables, is_weighted, type(self).__name__)
        # the op calls' groups, and the KJT key of each output feature (tuples: fx constants)
        self._groups = tuple(layout.groups)
        self._output_features = tuple(f.feature for f in layout.features)
        self.register_state_dict_post_hook(TableCollection._emit_table_entries)
        self.register_load_state_dict_pre_hook(TableCollection._absorb_table_entries)

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

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return self._flat(self._layout.tables[0]).device

    def table_weight(self, table: int) -> torch.Tensor:
        """``[rows, stride]`` view of table ``table`` (config index) in its flat tensor: ``[rows,
        dim]`` float rows, or ``[rows, row_bytes]`` uint8 quantized ones."""
        slot = self._layout.tables[table]
        return self._flat(slot).narrow(0, slot.offset, slot.rows * slot.stride).view(slot.rows, slot.stride)

    # --- storage: what a subclass decides --------------------------------------------------
    def _allocate(self, device: Optional[torch.device]) -> None:
        """Register the flat tensors (as parameters or buffers) on this module."""
        raise NotImplementedError

    def _storage(self) -> Dict[str, torch.Tensor]:
        """Every flat tensor, by its own ``state_dict`` key (relative to this module), which
        ``state_dict()`` replaces with one entry per table."""
        raise NotImplementedError

    def _storage_key(self, slot: TableSlot) -> str:
        """The ``_storage()`` key of the flat tensor holding ``slot``'s table."""
        raise NotImplementedError

    def _flat(self, slot: TableSlot) -> torch.Tensor:
        return self._storage()[self._storage_key(slot)]

    def _entry_error(self, key: str, slot: TableSlot, value: torch.Tensor) -> Optional[str]:
        """Why ``value`` cannot load into ``slot``'s table (None: it can)."""
        if tuple(value.shape) != (slot.rows, slot.stride):
            return (f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                    f"the shape in current model is {(slot.rows, slot.stride)}.")
        return None

    # --- state_dict in TorchRec's format: one [rows, stride] entry per table ------------------
    def _emit_table_entries(self, state_dict, prefix: str, local_metadata) -> None:
        """Post-hook of ``state_dict()``: the flat tensors' entries become per-table views."""
        flats = {key: state_dict.pop(f"{prefix}{key}") for key in self._storage()}
        for slot in self._layout.tables:
            flat = flats[self._storage_key(slot)]
            state_dict[f"{prefix}{self.views_name}.{slot.name}.weight"] = (
                flat.narrow(0, slot.offset, slot.rows * slot.stride).view(slot.rows, slot.stride))

    def _absorb_table_entries(self, state_dict, prefix: str, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Pre-hook of ``load_state_dict()``: copy ``<views_name>.<table>.weight`` entries into
        the flat tensors, in place."""
        with torch.no_grad():
            for t, slot in enumerate(self._layout.tables):
                key = f"{prefix}{self.views_name}.{slot.name}.weight"
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict.pop(key)
                error = self._entry_error(key, slot, value)
                if error is not None:
                    error_msgs.append(error)
                    continue
                target = self.table_weight(t)
                if target.device.type != "meta":
                    target.copy_(value)
        for key, flat in self._storage().items():
            # already loaded above: let the default loader copy each flat tensor onto itself
            state_dict.setdefault(f"{prefix}{key}", flat.detach())

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
        return [self._layout.features[i].feature for g in self._groups for i in g.features]

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


class FloatTableCollection(TableCollection):
    """Float tables, trained: one flat parameter per dtype (``flat_weights``, laid out by
    ``TableLayout``), initialised from the configs, and the fused optimizer's state and
    learning rate. Base of ``EmbeddingBagCollection`` and ``EmbeddingCollection``.

    At construction the tables take the random numbers TorchRec's modules take: TorchRec builds
    each table as an ``nn.EmbeddingBag`` / ``nn.Embedding``, whose own init draws N(0, 1), and
    then runs the config's ``init_fn``. Drawing (and overwriting) the same numbers keeps a seeded
    program's tables equal to TorchRec's. ``draws_all_first``: TorchRec's bag collection draws
    every table before initialising any; its unpooled one initialises each after its draw.
    """

    draws_all_first: bool = True

    def __init__(self, tables: Sequence[BaseEmbeddingConfig], device: Optional[torch.device],
                 options: CollectionOptions, is_weighted: Optional[bool]) -> None:
        device = torch.device(device) if device is not None else None
        super().__init__(TableLayout(tables, self.config_type), options, is_weighted, device)
        if device is None or device.type != "meta":
            self._init_tables(torchrec_draws=True)
        if any(flat.device.type == "cpu" for flat in self.flat_weights.values()):
            retain_freed_memory()  # after the tables are allocated: they keep their own mappings

    def _allocate(self, device: Optional[torch.device]) -> None:
        fused = self._options.fused_optimizer
        # updated in place by a fused optimizer, which needs no gradient of them (see FusedOptimizerState)
        self.flat_weights = nn.ParameterDict({
            g.name: nn.Parameter(torch.empty(g.numel, dtype=g.dtype, device=device), requires_grad=fused is None)
            for g in self._layout.groups})
        for flat in self.flat_weights.values():
            advise_huge_pages(flat)  # before reset_parameters first touches the pages
        self.fused_optimizer_state = FusedOptimizerState(self._layout, fused, device)

    def _storage(self) -> Dict[str, torch.Tensor]:
        return {f"flat_weights.{name}": flat for name, flat in self.flat_weights.items()}

    def _storage_key(self, slot: TableSlot) -> str:
        return f"flat_weights.{self._layout.groups[slot.group].name}"

    def reset_parameters(self) -> None:
        """Re-initialise every table: its config's ``init_fn``, else uniform in [min, max]."""
        self._init_tables(torchrec_draws=False)

    @torch.no_grad()
    def _init_tables(self, torchrec_draws: bool) -> None:
        for flat in self.flat_weights.values():
            if flat.device.type != "meta":
                flat.zero_()  # the alignment gaps between blocks stay zero
        tables = [t for t in range(len(self._layout.configs)) if self.table_weight(t).device.type != "meta"]
        if torchrec_draws and self.draws_all_first:
            for t in tables:
                self.table_weight(t).normal_()  # [rows, dim], contiguous: nn.EmbeddingBag's own draw
        for t in tables:
            config, view = self._layout.configs[t], self.table_weight(t)
            if torchrec_draws and not self.draws_all_first:
                view.normal_()  # nn.Embedding's own draw
            if config.init_fn is not None:
                result = config.init_fn(view)
                if isinstance(result, torch.Tensor) and result.data_ptr() != view.data_ptr():
                    view.copy_(result)
            else:
                view.uniform_(config.weight_init_min, config.weight_init_max)
        self.fused_optimizer_state.reset()
        if self.skipped_ids.device.type != "meta":
            self.skipped_ids.zero_()

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
