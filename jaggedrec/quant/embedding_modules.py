"""``jaggedrec.quant.EmbeddingBagCollection``: the bag collection's forward over row-wise
quantized tables (INT8, INT4, FP16), for inference."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from jaggedrec.modules import batch as batch_reader
from jaggedrec.modules import validation
from jaggedrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from jaggedrec.modules.embedding_modules import EmbeddingBagCollection as FloatEmbeddingBagCollection
from jaggedrec.sparse.jagged_tensor import KeyedJaggedTensor
from jaggedrec.sparse.jagged_tensor import KeyedTensor
from jaggedrec.ops import quantized as quantized_ops
from jaggedrec.modules.bad_ids import BadIdReport
from jaggedrec.modules.collection import CollectionOptions
from jaggedrec.ops import vbe
from jaggedrec.ops.backends import use_kernels
from jaggedrec.quant.rowwise import CLAMP_LIMIT, ON_OVERFLOW, QUANT_TYPES, fit_rows, quantize_rows
from jaggedrec.quant.storage import STORAGE_CODES, QuantGroup, QuantLayout

_BUFFER_NAMES = {DataType.INT8: "int8", DataType.INT4: "int4", DataType.FP16: "fp16"}


class EmbeddingBagCollection(nn.Module):
    """Pools each feature's ids through its quantized table, for all tables at once: KJT in,
    ``[B, sum(dims)]`` fp32 ``KeyedTensor`` out, with the float collection's keys and order,
    SUM, MEAN and per-id weights. Inference only: the tables take no gradient.

    Build it from a trained float collection with :meth:`from_float`, or from configs whose
    ``data_type`` is INT8, INT4 or FP16 (the tables then hold zeros until a ``state_dict`` is
    loaded).

    Args:
        tables: ``EmbeddingBagConfig`` per table, ``data_type`` INT8, INT4 or FP16.
        is_weighted, device, validate, backend, bounds_check: as in ``jaggedrec.EmbeddingBagCollection``.
        row_align: each row's stride is rounded up to this many bytes; default 16 on CUDA
            (vector loads), 1 elsewhere (torch's CPU quantized ops need the exact layout). FP16
            rows need an even stride (an odd one is refused here, naming the table).

    Storage: ``qweights_int8``, ``qweights_int4``, ``qweights_fp16``, one flat uint8 buffer per
    storage type present (layouts in ``quant/rowwise.py``); ``embedding_bags[name].weight``
    is a live ``[rows, row_bytes]`` uint8 view, and ``state_dict()`` holds those views
    (``embedding_bags.<table>.weight``).
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, validate: bool = True,
                 row_align: Optional[int] = None, backend: str = "auto", bounds_check: str = "raise") -> None:
        super().__init__()
        self._options = CollectionOptions(backend=backend, validate=validate, bounds_check=bounds_check)
        self._bad_id_report = BadIdReport()
        for t in tables:
            if not isinstance(t, EmbeddingBagConfig):
                raise TypeError(f"tables must be EmbeddingBagConfig, got {type(t).__name__}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if row_align is None:
            row_align = 16 if device.type == "cuda" else 1
        self._layout = QuantLayout(tables, row_align)
        self._is_weighted = is_weighted
        for data_type in QUANT_TYPES:  # absent types get empty buffers: the op takes all three
            size = self._layout.buffer_bytes.get(data_type, 0)
            self.register_buffer(f"qweights_{_BUFFER_NAMES[data_type]}",
                                 torch.zeros(size, dtype=torch.uint8, device=device))
        features = self._layout.features()
        slots = [self._layout.tables[t] for _, _, t in features]
        self._group = QuantGroup(tuple(range(len(features))), tuple(f for f, _, _ in features),
                                 tuple(s.offset for s in slots),
                                 tuple(s.rows for s in slots), tuple(s.dim for s in slots),
                                 tuple(int(self._layout.configs[t].pooling == PoolingType.MEAN) for _, _, t in features),
                                 tuple(STORAGE_CODES[s.data_type] for s in slots), tuple(s.row_bytes for s in slots))
        self._groups = (self._group,)
        self._embedding_names = [name for _, name, _ in features]
        self._length_per_embedding = [s.dim for s in slots]
        self._output_features = tuple(f for f, _, _ in features)
        key_rows: Dict[str, int] = {}
        key_tables: Dict[str, List[str]] = {}
        for f, _, t in features:
            slot = self._layout.tables[t]
            key_rows[f] = min(key_rows.get(f, slot.rows), slot.rows)
            key_tables.setdefault(f, []).append(slot.name)
        self._spec = validation.FeatureSpec(key_rows, key_tables, is_weighted, type(self).__name__)
        self.embedding_bags = nn.ModuleDict({s.name: _QuantTable(self, t) for t, s in enumerate(self._layout.tables)})
        self.register_state_dict_post_hook(_emit_tables)
        self.register_load_state_dict_pre_hook(_absorb_tables)

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
                module.table_rows(t).copy_(quantize_rows(weight, c.data_type, module._layout.row_align, c.name))
        counts = [f"{n} of {c.num_embeddings} rows of table '{c.name}' ({c.data_type.value}, into "
                  f"+-{CLAMP_LIMIT[c.data_type]:.6g})" for c in configs if (n := clamped[c.name])]
        if counts:
            warnings.warn(f"on_overflow='clamp': clamped the rows whose quantized values would have been inf or "
                          f"NaN: {', '.join(counts)}", stacklevel=2)
        return module

    def table_rows(self, table: int) -> torch.Tensor:
        """``[rows, row_bytes]`` uint8 view of table ``table`` (config index)."""
        slot = self._layout.tables[table]
        buffer = getattr(self, f"qweights_{_BUFFER_NAMES[slot.data_type]}")
        return buffer.narrow(0, slot.offset, slot.rows * slot.row_bytes).view(slot.rows, slot.row_bytes)

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

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._layout.configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self.qweights_int8.device

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """
        Args:
            features: a KJT as the float collection takes it (VBE included).
        Returns:
            KeyedTensor with ``[B, sum(dims)]`` fp32 values.
        """
        batch = batch_reader.read_batch(features, self._spec, self._groups, self._output_features, self.validate)
        pooled, bad_ids = quantized_ops.run_quantized_embedding_bags(
            self.qweights_int8, self.qweights_int4, self.qweights_fp16, batch.values, batch.offsets, batch.weights,
            batch.group_tables[0], self._options.backend)
        if (self._options.bounds_check != "off" and use_kernels(self._options.backend, self.device)
                and not torch.compiler.is_compiling() and not isinstance(pooled, torch.fx.Proxy)):
            if self._options.bounds_check == "clamp":
                self._bad_id_report.push(bad_ids, list(self._output_features))
            elif not self.validate and bool(bad_ids.any()):
                validation.check_data(features, self._spec)  # raises, naming the feature, id and sample
        inverse = batch.group_inverse[0]
        if inverse is not None:
            pooled = vbe.expand_rows(pooled, inverse, _column_offsets(self._length_per_embedding))
        return KeyedTensor(self._embedding_names, self._length_per_embedding, pooled)


def _column_offsets(dims: Sequence[int]) -> List[int]:
    out = [0]
    for d in dims:
        out.append(out[-1] + d)
    return out


class _QuantTable(nn.Module):
    """One quantized table: ``weight`` is a live ``[rows, row_bytes]`` uint8 view of its buffer."""

    def __init__(self, owner: EmbeddingBagCollection, table: int) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner
        self._table = table
        slot = owner._layout.tables[table]
        self.num_embeddings, self.embedding_dim, self.data_type = slot.rows, slot.dim, slot.data_type

    @property
    def weight(self) -> torch.Tensor:
        return self.__dict__["_owner"].table_rows(self._table)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, data_type={self.data_type}"


def _emit_tables(module: EmbeddingBagCollection, state_dict, prefix: str, local_metadata) -> None:
    for data_type in QUANT_TYPES:
        state_dict.pop(f"{prefix}qweights_{_BUFFER_NAMES[data_type]}", None)
    for t, slot in enumerate(module._layout.tables):
        state_dict[f"{prefix}embedding_bags.{slot.name}.weight"] = module.table_rows(t)


def _absorb_tables(module: EmbeddingBagCollection, state_dict, prefix: str, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    with torch.no_grad():
        for t, slot in enumerate(module._layout.tables):
            key = f"{prefix}embedding_bags.{slot.name}.weight"
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            target = module.table_rows(t)
            if tuple(value.shape) != tuple(target.shape) or value.dtype != torch.uint8:
                error_msgs.append(f"size mismatch for {key}: copying {value.dtype} rows of shape "
                                  f"{tuple(value.shape)}, the model has uint8 {tuple(target.shape)} "
                                  f"({slot.data_type}, dim {slot.dim}, row_align {module._layout.row_align})")
                continue
            target.copy_(value)
    for data_type in QUANT_TYPES:
        name = f"qweights_{_BUFFER_NAMES[data_type]}"
        state_dict.setdefault(f"{prefix}{name}", getattr(module, name))


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
