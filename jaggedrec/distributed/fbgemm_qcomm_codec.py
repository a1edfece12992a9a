"""Quantized collectives' configuration, at TorchRec's path
(``torchrec.distributed.fbgemm_qcomm_codec``), so that programs written for TorchRec import.

TorchRec can compress the embeddings its sharded modules send (FP16, BF16, FP8, INT8, MX4
all-to-alls and reduce-scatters). jaggedrec sends them uncompressed: it has no codecs. So
``get_qcomm_codecs_registry`` returns None for an all-FP32 config (no compression: what
jaggedrec does anyway), and for any other config a registry naming the collectives that
were asked to compress, which jaggedrec's sharders refuse with a ``ValueError`` rather than
train at a precision other than the one asked for. A program that asks for quantized
collectives only on NCCL (as TorchRec's golden training example does) runs unchanged on gloo.
"""

import copy
from dataclasses import dataclass
from enum import Enum, unique
from typing import Any, Dict, List, Optional

import torch


@unique
class CommType(Enum):
    """The precisions TorchRec's codecs send."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    MX4 = "mx4"

    def __str__(self) -> str:
        return self.value


@dataclass
class QCommsConfig:
    """The precision of the forward and backward collectives, and the codec knobs TorchRec
    takes (kept so that configs written for it construct; jaggedrec uses none of them).
    The ``*_dtype`` and ``mx4_rounding_mode`` fields take fbgemm's enum values."""

    forward_precision: CommType = CommType.FP32
    backward_precision: CommType = CommType.FP32
    forward_loss_scale: Optional[float] = None
    backward_loss_scale: Optional[float] = None
    fp8_quantize_dim: Optional[int] = None
    fp8_quantize_dim_bwd: Optional[int] = None
    fp8_bwd_uses_143: Optional[bool] = False
    fp8_output_dtype: Optional[Any] = None
    mx4_quantize_dim: Optional[int] = None
    mx4_quantize_dim_bwd: Optional[int] = None
    mx4_rounding_mode: Optional[Any] = None
    output_dtype: Optional[Any] = None

    def __post_init__(self) -> None:
        for name in ("forward_precision", "backward_precision"):
            value = getattr(self, name)
            if not isinstance(value, CommType):
                raise TypeError(f"QCommsConfig: {name} must be a CommType, got {value!r}")

    @property
    def quantized(self) -> bool:
        """Whether either direction asks for less than FP32."""
        return (self.forward_precision, self.backward_precision) != (CommType.FP32, CommType.FP32)


# the collectives TorchRec's registry covers by default, by TorchRec's CommOp names
DEFAULT_COMM_OPS = ("POOLED_EMBEDDINGS_ALL_TO_ALL", "POOLED_EMBEDDINGS_REDUCE_SCATTER",
                    "SEQUENCE_EMBEDDINGS_ALL_TO_ALL")


def get_qcomm_codecs_registry(qcomms_config: QCommsConfig, comm_ops: Optional[List[Any]] = None,
                              device: Optional[torch.device] = None) -> Optional[Dict[str, QCommsConfig]]:
    """None when ``qcomms_config`` asks for FP32 both ways; otherwise ``{collective name:
    config}`` for each of ``comm_ops`` (TorchRec ``CommOp`` values or names; its three
    embedding collectives by default). jaggedrec's sharders refuse such a registry with a
    ``ValueError``: jaggedrec has no quantized collectives. ``device`` is accepted for
    TorchRec's signature and unused."""
    if not qcomms_config.quantized:
        return None
    ops = DEFAULT_COMM_OPS if comm_ops is None else [getattr(op, "name", op) for op in comm_ops]
    return {str(op): copy.deepcopy(qcomms_config) for op in ops}


__all__ = ["CommType", "QCommsConfig", "get_qcomm_codecs_registry"]
