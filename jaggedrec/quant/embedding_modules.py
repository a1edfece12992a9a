"""``jaggedrec.quant.EmbeddingBagCollection``: the bag collection's forward over row-wise
quantized tables (INT8, INT4, FP16), for inference."""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from jaggedrec.modules import batch as batch_reader
from jaggedrec.modules.collection import CollectionOptions, TableCollection, TableView
from jaggedrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from jaggedrec.modules.embedding_modules import EmbeddingBagCollection as FloatEmbeddingBagCollection
from jaggedrec.modules.table_layout import TableSlot
from jaggedrec.ops import quantized as quantized_ops
from jaggedrec.ops import vbe
from jaggedrec.ops.feature_tables import STORAGE_FP16, STORAGE_INT4, STORAGE_INT8, feature_tables
from jaggedrec.ops.quantized_plan import QuantPlan
from jaggedrec.quant import host_path
from jaggedrec.quant.rowwise import CLAMP_LIMIT, ON_OVERFLOW, QUANT_TYPES, fit_rows, quantize_rows
from jaggedrec.quant.storage import BUFFER_NAMES, QuantLayout
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor, as_keyed_jagged_tensor


class QuantEmbeddingBag(TableView):
    """One quantized table (see ``TableView``): ``weight`` is a live ``[rows, row_bytes]`` uint8
    view of its storage type's buffer."""

    def __init__(self, owner: "EmbeddingBagCollection", table: int) -> None:
        super().__init__(owner, table)
        self.data_type = owner.layout.tables[table].data_type

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, data_type={self.data_type}"


class EmbeddingBagCollection(TableCollection):
    """Pools each feature's ids through its quantized table, for all tables at once: KJT in,
    ``[B, sum(dims)]`` fp32 ``KeyedTensor`` out, with the float collection's keys and order,
    SUM, MEAN and per-id weights. Inference only: the tables take no gradient.

    Build it from a trained float collection with :meth:`from_float`, or from configs whose
    ``data_type`` is INT8, INT4 or FP16 (the tables then hold zeros until a ``state_dict`` is
    loaded). Layout, views, ``state_dict`` entries, input checks and bad-id handling are the
    float collections' (``jaggedrec/modules/collection.py``); only storage differs.

    Args:
        tables: ``EmbeddingBagConfig`` per table, ``data_type`` INT8, INT4 or FP16.
        is_weighted, device, validate, backend, bounds_check: as in ``jaggedrec.EmbeddingBagCollection``
            (kept, with the rest at their defaults, as ``options``).
        row_align: each row's stride is rounded up to this many bytes; default 16 on CUDA
            (vector loads), 1 elsewhere (torch's CPU quantized ops need the exact layout). FP16
            rows need an even stride (an odd one is refused here, naming the table).

    Storage: ``qweights_int8``, ``qweights_int4``, ``qweights_fp16``, one flat uint8 buffer per
    storage type (empty when unused; byte layouts in ``jaggedrec/ops/quantized_rows.py``);
    ``embedding_bags[name].weight`` is a live ``[rows, row_bytes]`` uint8 view, and
    ``state_dict()`` holds those views (``embedding_bags.<table>.weight``).
    """

    config_type = EmbeddingBagConfig
    view_type = QuantEmbeddingBag
    views_name = "embedding_bags"

    def __init__(self, tables: Sequence[EmbeddingBagConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, validate: bool = True,
                 row_align: Optional[int] = None, backend: str = "auto", bounds_check: str = "raise") -> None:
        options = CollectionOptions(backend=backend, validate=validate, bounds_check=bounds_check)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if row_align is None:
            row_align = 16 if device.type == "cuda" else 1
        super().__init__(QuantLayout(tables, row_align), options, is_weighted, device)
        self._is_weighted = is_weighted
        self._embedding_names = self._layout.embedding_names
        self._lengths_per_embedding = self._layout.embedding_dims()
        columns = [0]
        for d in self._lengths_per_embedding:
            columns.append(columns[-1] + d)
        self._column_offsets = columns  # where each feature's columns start, for VBE's expansion

    def _allocate(self, device: Optional[torch.device]) -> None:
        for data_type in QUANT_TYPES:  # absent types get empty buffers: the op takes all three
            size = self._layout.storage_sizes.get(data_type, 0)
            self.register_buffer(f"qweights_{BUFFER_NAMES[data_type]}",
                                 torch.zeros(size, dtype=torch.uint8, device=device))

    def _storage(self) -> Dict[str, torch.Tensor]:
        return {f"qweights_{name}": getattr(self, f"qweights_{name}") for name in BUFFER_NAMES.values()}

    def _storage_key(self, slot: TableSlot) -> str:
        return f"qweights_{BUFFER_NAMES[slot.data_type]}"

    def _entry_error(self, key: str, slot: TableSlot, value: torch.Tensor) -> Optional[str]:
        if tuple(value.shape) != (slot.rows, slot.stride) or value.dtype != torch.uint8:
            return (f"size mismatch for {key}: copying {value.dtype} rows of shape {tuple(value.shape)}, the model "
                    f"has uint8 {(slot.rows, slot.stride)} ({slot.data_type}, dim {slot.dim}, "
                    f"row_align {self._layout.row_align})")
        return None

    @classmethod
    def from_float(cls, ebc: FloatEmbeddingBagCollection, data_type: DataType = DataType.INT8,
                   per_table_data_type: Optional[Dict[str, DataType]] = None, validate: Optional[bool] = None,
                   row_align: Optional[int] = None, backend: Optional[str] = None,
                   on_overflow: str = "raise") -> "EmbeddingBagCollection":
        """Quantize a float collection's tables row by row: every table to ``data_type``, or
        to its entry in ``per_table_data_type`` (by table name), e.g. big tables INT4 and small
        ones FP16.

        Args:
            on_overflow: what to do with a row whose quantized form would be inf or NaN (FP16
                values, or INT4's fp16 scale and bias, past +-65504; an INT8 row spanning more
                than fp32 holds): "raise" (default) a ValueError naming the table and its first
                such row; "clamp" such rows into ``rowwise.CLAMP_LIMIT`` and warn once, naming
                the tables and how many rows each had clamped. A row holding NaN always raises.
        """
        if on_overflow not in ON_OVERFLOW:
            raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
        per_table = dict(per_table_data_type or {})
        unknown = sorted(set(per_table) - {c.name for c in ebc.embedding_bag_configs()})
        if unknown:
            raise ValueError(f"per_table_data_type names tables this collection does not have: {unknown}")
        configs = []
        for c in ebc.embedding_bag_configs():
            q = copy.copy(c)
            q.data_type = per_table.get(c.name, data_type)
            configs.append(q)
        device = ebc.device
        module = cls(configs, is_weighted=ebc.is_weighted(), device=device,
                     validate=ebc.validate if validate is None else validate, row_align=row_align,
                     backend=ebc.options.backend if backend is None else backend,
                     bounds_check=ebc.options.bounds_check)
        clamped: Dict[str, int] = {}
        with torch.no_grad():
            for t, c in enumerate(configs):
                # on the CPU: a one-off, with the same rounding (nextafter on fp16) on every device
                weight = ebc.embedding_bags[c.name].weight.detach().cpu()
                weight, clamped[c.name] = fit_rows(weight, c.data_type, on_overflow, c.name)
                module.table_rows(t).copy_(quantize_rows(weight, c.data_type, module.layout.row_align, c.name))
        counts = [f"{n} of {c.num_embeddings} rows of table '{c.name}' ({c.data_type.value}, into "
                  f"+-{CLAMP_LIMIT[c.data_type]:.6g})" for c in configs if (n := clamped[c.name])]
        if counts:
            warnings.warn(f"on_overflow='clamp': clamped the rows whose quantized values would have been inf or "
                          f"NaN: {', '.join(counts)}", stacklevel=2)
        return module

    def table_rows(self, table: int) -> torch.Tensor:
        """``[rows, row_bytes]`` uint8 view of table ``table`` (config index): ``table_weight``."""
        return self.table_weight(table)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._layout.configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            features: a KJT as the float collection takes it (VBE included; jaggedrec's or
                TorchRec's).
        Returns:
            KeyedTensor with ``[B, sum(dims)]`` fp32 values.
        """
        if not self._lengths_per_embedding:  # built with no tables, as the float collection allows
            raise ValueError("EmbeddingBagCollection has no tables: there is nothing to pool")
        if type(features) is not KeyedJaggedTensor:
            features = as_keyed_jagged_tensor(features)
        options = self._options
        if options.backend != "triton":
            stored = self._buffers  # read once: each attribute lookup through nn.Module searches three dicts
            buffers = {STORAGE_INT8: stored["qweights_int8"], STORAGE_INT4: stored["qweights_int4"],
                       STORAGE_FP16: stored["qweights_fp16"]}
            stride = host_path.serves(features, buffers)
            if stride:
                pooled = host_path.pooled(features, self._spec, self._plan_for(features), buffers, options.validate,
                                          stride)
                return KeyedTensor(self._embedding_names, self._lengths_per_embedding, pooled)
        batch = batch_reader.read_batch(features, self._spec, self._groups, self._output_features, options.validate)
        pooled, bad_ids = quantized_ops.run_quantized_embedding_bags(
            self.qweights_int8, self.qweights_int4, self.qweights_fp16, batch.values, batch.offsets, batch.weights,
            batch.group_tables[0], options.backend)
        self._handle_bad_ids(features, [bad_ids], pooled)
        inverse = batch.group_inverse[0]
        if inverse is not None:
            pooled = vbe.expand_rows(pooled, inverse, self._column_offsets)
        return KeyedTensor(self._embedding_names, self._lengths_per_embedding, pooled)

    def _plan_for(self, features: KeyedJaggedTensor) -> QuantPlan:
        """The torch path's plan for ``features``' key order (raises naming missing features),
        kept per order with its row views."""
        # kept in the instance's dict: a module pickled before this cache existed gets it on first use
        cache: Dict[Tuple[str, ...], QuantPlan] = self.__dict__.setdefault("_host_plans", {})
        keys = tuple(features.keys())
        plan = cache.get(keys)
        if plan is None:
            encoded = batch_reader.group_feature_tables(keys, self._groups, tuple(self._spec.key_rows),
                                                        self._spec.owner)[0]
            plan = cache[keys] = QuantPlan(feature_tables(encoded))
        return plan


def quantize_embeddings(module: nn.Module, dtype: torch.dtype = torch.qint8, inplace: bool = True,
                        per_table_weight_dtype: Optional[Dict[str, torch.dtype]] = None,
                        on_overflow: str = "raise") -> nn.Module:
    """Swap every ``jaggedrec.EmbeddingBagCollection`` inside ``module`` (or ``module`` itself)
    for its quantized twin, as TorchRec's function of this name does.

    Args:
        dtype: ``torch.qint8`` (or ``torch.quint8``, ``torch.int8``) for INT8, ``torch.quint4x2``
            for INT4, ``torch.half`` for FP16.
        inplace: change ``module`` (else a deep copy of it).
        per_table_weight_dtype: table name -> dtype, overriding ``dtype`` for those tables.
        on_overflow: "raise" or "clamp", for rows whose quantized values would be inf or NaN
            (see :meth:`EmbeddingBagCollection.from_float`).
    """
    if on_overflow not in ON_OVERFLOW:
        raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
    data_type = _data_type(dtype)
    per_table = {name: _data_type(d) for name, d in (per_table_weight_dtype or {}).items()}
    if not inplace:
        module = copy.deepcopy(module)
    if isinstance(module, FloatEmbeddingBagCollection):
        return EmbeddingBagCollection.from_float(module, data_type, _for(module, per_table), on_overflow=on_overflow)
    for name, child in list(module.named_children()):
        setattr(module, name, quantize_embeddings(child, dtype, inplace=True,
                                                  per_table_weight_dtype=per_table_weight_dtype,
                                                  on_overflow=on_overflow))
    return module


def _for(ebc: FloatEmbeddingBagCollection, per_table: Dict[str, DataType]) -> Dict[str, DataType]:
    names = {c.name for c in ebc.embedding_bag_configs()}
    return {name: d for name, d in per_table.items() if name in names}


def _data_type(dtype: torch.dtype) -> DataType:
    if dtype in (torch.qint8, torch.quint8, torch.int8, torch.uint8):
        return DataType.INT8
    if dtype == torch.quint4x2:
        return DataType.INT4
    if dtype in (torch.half, torch.float16):
        return DataType.FP16
    raise ValueError(f"quantize_embeddings: dtype must be torch.qint8, torch.quint4x2 or torch.half, got {dtype}")
