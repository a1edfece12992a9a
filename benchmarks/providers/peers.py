"""Providers from other libraries: TorchRec's EmbeddingBagCollection and FBGEMM's TBE, and
for ``--module ec`` TorchRec's EmbeddingCollection and FBGEMM's TBE with ``PoolingMode.NONE``.

Both are optional. Where one can't be imported, its ``skip_reason`` says why and how to
install it; the import itself happens there, before any memory is measured, so that
importing a library is not counted as a provider's memory.

On CPU these installs work with torch 2.13.0::

    pip install fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0 \
        && pip install tensordict torchmetrics==1.0.3 tqdm pyre-extensions
"""

from __future__ import annotations

from typing import Optional

import torch

from ..workload import OPTIMIZERS, Workload
from .base import LEARNING_RATE, EcProvider, Provider

INSTALL_HINT = ("pip install fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0 && "
                "pip install tensordict torchmetrics==1.0.3 tqdm pyre-extensions")


def import_error(importer) -> Optional[str]:
    try:
        importer()
    except Exception as e:  # ImportError, and the OSErrors of a mismatched native library
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        return f"not importable ({type(e).__name__}: {first_line}); on CPU: {INSTALL_HINT}"
    return None


def import_torchrec():
    from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: F401
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: F401


def _import_fbgemm():
    import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401


class TorchRecEBC(Provider):
    name = "torchrec_ebc"
    description = "torchrec.EmbeddingBagCollection (unsharded): KJT.to_dict(), then one nn.EmbeddingBag per table"

    def skip_reason(self, w: Workload) -> Optional[str]:
        return import_error(import_torchrec)

    def build(self, tables, w):
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.mode, self.keys, self.w = w.mode, w.keys, w
        # built on meta, then given storage: every weight is overwritten by load_state_dict
        ebc = EmbeddingBagCollection(torchrec_configs(w), is_weighted=w.weighted, device=torch.device("meta"))
        ebc = ebc.to_empty(device=w.device)
        ebc.load_state_dict({f"embedding_bags.t{t}.weight": table for t, table in enumerate(tables)})
        self.module = ebc
        if w.mode == "train":
            self.note = "dense grads + torch.optim.SGD (the unsharded module has no sparse or fused path)"
            self.optimizer = torch.optim.SGD(ebc.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        return self.module(torchrec_kjt(self.keys, batch, self.w.batch_size)).values()


def torchrec_configs(w: Workload) -> list:
    """The workload's tables as TorchRec's ``EmbeddingBagConfig``: table ``t{t}`` serves ``f{t}``."""
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

    data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16, "bf16": DataType.BF16}[w.dtype]
    return [EmbeddingBagConfig(name=f"t{t}", embedding_dim=d, num_embeddings=w.num_embeddings,
                               feature_names=[f"f{t}"], data_type=data_type)
            for t, d in enumerate(w.table_dims)]


def torchrec_kjt(keys, batch, batch_size: int):
    """A fresh TorchRec KJT over ``batch`` (``batch_size`` bags per key): TorchRec caches its
    to_dict() split on the KJT object, so every step gets a new one. length_per_key comes from
    the host, as the loop's feature boundaries do."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=keys, values=batch.values, weights=batch.weights, lengths=batch.lengths,
                             offsets=batch.offsets, stride=batch_size, length_per_key=batch.ids_per_feature)


_FBGEMM_CPU_OPTIMIZERS = ("exact_sgd", "exact_rowwise_adagrad", "exact_adagrad")


class FbgemmTBE(Provider):
    """FBGEMM's table-batched embedding bags.

    forward and train modes use ``SplitTableBatchedEmbeddingBagsCodegen`` with its fused
    ``EXACT_SGD`` (the update happens inside backward, no separate optimizer step). TBE has
    no plain dense-gradient backward, so backward mode uses FBGEMM's
    ``DenseTableBatchedEmbeddingBagsCodegen``, its table-batched ``nn.EmbeddingBag(sparse=False)``.
    """

    name = "fbgemm_tbe"
    description = "fbgemm_gpu SplitTableBatchedEmbeddingBagsCodegen (backward mode: DenseTableBatched...)"
    optimizers = OPTIMIZERS

    def skip_reason(self, w: Workload) -> Optional[str]:
        reason = import_error(_import_fbgemm)
        if reason is None and w.device == "cpu" and w.dtype == "bf16":
            return "FBGEMM's CPU kernels have no bf16 tables"
        if reason is None and w.mode == "train" and w.device == "cpu" and w.optimizer not in _FBGEMM_CPU_OPTIMIZERS:
            return f"FBGEMM steps {w.optimizer.upper()} on GPU only"
        return reason

    def build(self, tables, w):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (ComputeDevice, EmbeddingLocation,
                                                                           PoolingMode)
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            DenseTableBatchedEmbeddingBagsCodegen, SplitTableBatchedEmbeddingBagsCodegen)

        self.mode = w.mode
        precision = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "bf16": SparseType.BF16}[w.dtype]
        specs = [(w.num_embeddings, d) for d in w.table_dims]
        if w.mode == "backward":
            self.note = "DenseTableBatchedEmbeddingBagsCodegen (dense weight gradient)"
            tbe = DenseTableBatchedEmbeddingBagsCodegen(specs, weights_precision=precision,
                                                        pooling_mode=PoolingMode.SUM, use_cpu=w.device == "cpu")
        else:
            if w.mode == "train":
                self.note = f"fused {w.optimizer.upper()} inside backward (no optimizer.step)"
            place = ((EmbeddingLocation.HOST, ComputeDevice.CPU) if w.device == "cpu"
                     else (EmbeddingLocation.DEVICE, ComputeDevice.CUDA))
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                [(rows, dim, *place) for rows, dim in specs], optimizer=EmbOptimType[w.optimizer.upper()],
                learning_rate=LEARNING_RATE, weights_precision=precision, output_dtype=SparseType.FP32,
                pooling_mode=PoolingMode.SUM, device=torch.device(w.device))
        with torch.no_grad():
            for dst, src in zip(tbe.split_embedding_weights(), tables):
                dst.copy_(src)
        self.module = tbe

    def forward(self, batch):
        return self.module(batch.values, batch.offsets, per_sample_weights=batch.weights)


# --- the unpooled EmbeddingCollection (``--module ec``) ---------------------------------------

def _import_torchrec_ec():
    from torchrec.modules.embedding_modules import EmbeddingCollection  # noqa: F401
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: F401


class TorchRecEC(EcProvider):
    name = "torchrec_ec"
    description = "torchrec.EmbeddingCollection (unsharded): KJT.to_dict(), then one nn.Embedding per table"

    def skip_reason(self, w: Workload) -> Optional[str]:
        reason = import_error(_import_torchrec_ec)
        if reason is None and len(set(w.table_dims)) > 1:
            # its constructor raises "All tables in a EmbeddingCollection are required to have
            # same embedding dimension"; other dims would be other tables, nothing to compare
            return f"needs one embedding dim for all tables (this workload has {sorted(set(w.table_dims))})"
        if reason is None and w.dtype == "bf16":
            return "stores every non-fp32 table as fp16, so its bf16 tables would hold other values"
        return reason

    def build(self, tables, w):
        from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
        from torchrec.modules.embedding_modules import EmbeddingCollection

        self.mode, self.keys, self.w = w.mode, w.keys, w
        data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16}[w.dtype]
        configs = [EmbeddingConfig(name=f"t{t}", embedding_dim=d, num_embeddings=w.num_embeddings,
                                   feature_names=[f"f{t}"], data_type=data_type)
                   for t, d in enumerate(w.table_dims)]
        ec = EmbeddingCollection(tables=configs, device=torch.device(w.device))
        ec.load_state_dict({f"embeddings.t{t}.weight": table for t, table in enumerate(tables)})
        self.module = ec
        if w.mode == "train":
            self.note = "dense grads + torch.optim.SGD (the unsharded module has no sparse or fused path)"
            self.optimizer = torch.optim.SGD(ec.parameters(), lr=LEARNING_RATE)

    def rows(self, batch):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        # a fresh KJT per step, with length_per_key from the host, as for TorchRec's bag collection
        kjt = KeyedJaggedTensor(keys=self.keys, values=batch.values, lengths=batch.lengths, offsets=batch.offsets,
                                stride=self.w.batch_size, length_per_key=batch.ids_per_feature)
        out = self.module(kjt)
        return [out[k].values() for k in self.keys]


def _fbgemm_none_skip_reason(w: Workload) -> Optional[str]:
    reason = import_error(_import_fbgemm)
    if reason is None and len(set(w.table_dims)) > 1:
        # FBGEMM asserts "Mixed dimension tables only supported for pooling tables"
        dims = sorted(set(w.table_dims))
        return f"PoolingMode.NONE needs one embedding dim for all tables (this workload has {dims})"
    if reason is None and w.device == "cpu" and w.dtype == "bf16":
        return "FBGEMM's CPU kernels have no bf16 tables"
    return reason


def _split_rows(rows: torch.Tensor, batch) -> list:
    """TBE's ``[N, dim]`` rows (all features, in the KJT's id order) cut into each feature's."""
    return list(rows.split(batch.ids_per_feature))


class FbgemmTBENone(EcProvider):
    """FBGEMM's training TBE with ``PoolingMode.NONE``: one ``[N, dim]`` row per id.

    Forward mode runs it under ``no_grad``; train mode uses its fused ``EXACT_SGD`` (the
    update happens inside backward). It has no plain dense-gradient backward, and FBGEMM's
    dense TBE on CPU pools whatever the pooling mode (``[B, T * dim]`` out), so backward mode
    is skipped.
    """

    name = "fbgemm_tbe_none"
    description = "fbgemm_gpu SplitTableBatchedEmbeddingBagsCodegen(pooling_mode=PoolingMode.NONE)"

    def skip_reason(self, w: Workload) -> Optional[str]:
        reason = _fbgemm_none_skip_reason(w)
        if reason is None and w.mode == "backward":
            return ("no dense-gradient backward: the training TBE fuses its optimizer into the backward, and "
                    "DenseTableBatchedEmbeddingBagsCodegen on CPU ignores PoolingMode.NONE ([B, T*dim] out)")
        return reason

    def build(self, tables, w):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (ComputeDevice, EmbeddingLocation,
                                                                           PoolingMode)
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

        self.mode = w.mode
        if w.mode == "train":
            self.note = "fused EXACT_SGD inside backward (no optimizer.step)"
        precision = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "bf16": SparseType.BF16}[w.dtype]
        place = ((EmbeddingLocation.HOST, ComputeDevice.CPU) if w.device == "cpu"
                 else (EmbeddingLocation.DEVICE, ComputeDevice.CUDA))
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(w.num_embeddings, d, *place) for d in w.table_dims], optimizer=EmbOptimType.EXACT_SGD,
            learning_rate=LEARNING_RATE, weights_precision=precision, output_dtype=precision,
            pooling_mode=PoolingMode.NONE, device=torch.device(w.device))
        with torch.no_grad():
            for dst, src in zip(tbe.split_embedding_weights(), tables):
                dst.copy_(src)
        self.module = tbe

    def rows(self, batch):
        return _split_rows(self.module(batch.values, batch.offsets), batch)


class FbgemmInferenceTBENone(EcProvider):
    """FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``, what TorchRec's
    quantized modules serve with) with fp32/fp16 rows and ``PoolingMode.NONE``: forward only."""

    name = "fbgemm_inference_none"
    description = "fbgemm_gpu IntNBitTableBatchedEmbeddingBagsCodegen(pooling_mode=NONE), fp32/fp16 rows, forward"

    def skip_reason(self, w: Workload) -> Optional[str]:
        reason = _fbgemm_none_skip_reason(w)
        if reason is None and w.mode != "forward":
            return "an inference module: no backward"
        return reason

    def build(self, tables, w):
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        self.mode = w.mode
        precision = {"fp32": SparseType.FP32, "fp16": SparseType.FP16}[w.dtype]
        where = EmbeddingLocation.HOST if w.device == "cpu" else EmbeddingLocation.DEVICE
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            [(f"t{t}", w.num_embeddings, d, precision, where) for t, d in enumerate(w.table_dims)],
            pooling_mode=PoolingMode.NONE, output_dtype=precision, device=torch.device(w.device))
        tbe.fill_random_weights()  # allocates the row storage, which the copies below overwrite
        with torch.no_grad():
            for (dst, _), src in zip(tbe.split_embedding_weights(), tables):
                # rows are stored as bytes, each row possibly padded past its values
                values = src.contiguous().view(torch.uint8).view(src.shape[0], -1)
                dst[:, :values.shape[1]].copy_(values)
        self.module = tbe

    def rows(self, batch):
        return _split_rows(self.module(batch.values, batch.offsets), batch)
