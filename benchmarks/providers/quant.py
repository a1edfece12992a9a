"""Quantized tables (``jaggedrec-bench --dtype int8|int4``, forward mode only): jaggedrec.quant
against the fp32 module it is built from, TorchRec's quantized collection and torch's own
quantized embedding-bag ops in a per-table loop.

Every provider quantizes the same fp32 reference tables its own way (a scale and bias per row),
so an output is checked against the fp32 module's within the rounding bound of
``jaggedrec.quant`` (README, tests/test_quant.py): per pooled element, the sum over the bag's
ids of ``|weight|`` times the largest error of that id's quantized row
(``rowwise.error_bound``: half a step, plus fp32's rounding). jaggedrec.quant must stay
within it; the peers, which round their rows their own way, within :data:`PEER_FACTOR` times it.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from jaggedrec import quant
from jaggedrec.modules.embedding_configs import DataType
from jaggedrec.quant.rowwise import error_bound, quantize_rows

from ..workload import QUANT_DTYPES, Batch, Workload
from .base import Provider, Tolerance, feature_slices
from .jaggedrec import Jaggedrec
from .peers import TorchRecEBC, import_error

BASELINE = "jaggedrec_fp32"
# The peers round scale and bias their own way (TorchRec: fp16 scale and bias, codes from the
# fp16 scale; torch's 4-bit rows: both rounded to nearest, which can clamp a row's maximum), so
# an element may err a little past jaggedrec's half step (TorchRec's INT8 by 1e-5 of it on the
# benchmark's tables). Twice the bound, as tests/test_quant.py allows between jaggedrec and
# TorchRec, still catches a wrong row or bag.
PEER_FACTOR = 2.0
# fp32 sums in another order than the fp32 module's
_REL_TOL = 1e-5


def rounding_bound(w: Workload, tables: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
    """``[B, total_dim]`` the largest error each pooled element of jaggedrec's quantized
    ``tables`` (``[rows, dim]`` fp32 each) may have on ``batch``: per bag, the sum over its ids
    of ``|weight|`` times the id's row bound."""
    data_type = QUANT_DTYPES[w.dtype]
    ids, offsets, weights = feature_slices(batch, w.tables, w.batch_size, torch.float32)
    columns = []
    for table, i, o, psw in zip(tables, ids, offsets, weights):
        per_row = error_bound(quantize_rows(table, data_type), data_type, table.shape[1])  # [rows]
        bag = F.embedding_bag(i, per_row.unsqueeze(1), o, mode="sum", include_last_offset=True,
                              per_sample_weights=None if psw is None else psw.abs())  # [B, 1]
        columns.append(bag.expand(-1, table.shape[1]))
    return torch.cat(columns, dim=1)


def quant_tolerance(w: Workload, tables: Sequence[torch.Tensor], batch: Batch) -> Tolerance:
    return rounding_bound(w, tables, batch), _REL_TOL, f"{w.dtype}'s rounding bound"


class JaggedrecFp32(Jaggedrec):
    """The fp32 collection the quantized ones are built from: the baseline."""

    def __init__(self) -> None:
        super().__init__("auto")
        self.name = BASELINE
        self.description = ("jaggedrec.EmbeddingBagCollection (backend auto) on the fp32 tables: the reference "
                            "and the ratios' baseline")


class JaggedrecQuant(Jaggedrec):
    def __init__(self) -> None:
        super().__init__("auto")
        self.name = "jaggedrec_quant"
        self.description = ("jaggedrec.quant.EmbeddingBagCollection.from_float (backend auto: on CPU torch's "
                            "quantized ops, one call per run of same-type same-dim features or per feature; "
                            "one Triton launch on CUDA)")

    def build(self, tables, w):
        super().build(tables, w)
        self.module = quant.EmbeddingBagCollection.from_float(self.module, QUANT_DTYPES[w.dtype])


def _import_torchrec_quant():
    from torchrec.quant.embedding_modules import EmbeddingBagCollection  # noqa: F401


class TorchRecQuant(TorchRecEBC):
    name = "torchrec_quant"
    tolerance_factor = PEER_FACTOR
    description = "torchrec.quant.EmbeddingBagCollection.from_float (FBGEMM's IntNBit TBE), on CPU"

    def skip_reason(self, w):
        if w.device == "cuda":
            return "set up for TorchRec's CPU quantized module only"
        return import_error(_import_torchrec_quant)

    def build(self, tables, w):
        from torchrec.quant.embedding_modules import EmbeddingBagCollection

        super().build(tables, w.replace(dtype="fp32"))  # the float collection, then quantized
        weight = torch.qint8 if QUANT_DTYPES[w.dtype] == DataType.INT8 else torch.quint4x2
        self.module.qconfig = torch.ao.quantization.QConfig(
            activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
            weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=weight))
        self.module = EmbeddingBagCollection.from_float(self.module)


class TorchOpsLoop(Provider):
    name = "torch_ops_loop"
    tolerance_factor = PEER_FACTOR
    description = ("torch.ops.quantized.embedding_bag_byte_rowwise_offsets / _4bit_ (FBGEMM's CPU kernels in "
                   "torch) per table in a Python loop, on rows from torch's own prepack ops")

    def skip_reason(self, w):
        if w.device == "cuda":
            return "torch's quantized embedding-bag ops run on CPU only"
        return None

    def build(self, tables, w):
        int8 = QUANT_DTYPES[w.dtype] == DataType.INT8
        ops = torch.ops.quantized
        pack = ops.embedding_bag_byte_prepack if int8 else ops.embedding_bag_4bit_prepack
        self._op = ops.embedding_bag_byte_rowwise_offsets if int8 else ops.embedding_bag_4bit_rowwise_offsets
        self.module = nn.Module()
        for t, table in enumerate(tables):  # [rows, row_bytes] uint8 each
            self.module.register_buffer(f"t{t}", pack(table))
        self.w = w

    def forward(self, batch):
        rows = list(self.module.buffers())
        slices = zip(rows, *feature_slices(batch, self.w.tables, self.w.batch_size, torch.float32))
        # args: scale_grad_by_freq, mode (0: sum), pruned_weights, per_sample_weights,
        # compressed_indices_mapping, include_last_offset
        return torch.cat([self._op(r, i, o, False, 0, False, psw, None, True) for r, i, o, psw in slices], dim=1)


def quant_providers() -> List[Provider]:
    """Every provider of a quantized run, in report order; the ``jaggedrec_fp32`` baseline first."""
    return [JaggedrecFp32(), JaggedrecQuant(), TorchRecQuant(), TorchOpsLoop()]
