"""Providers from other libraries: TorchRec's EmbeddingBagCollection and FBGEMM's TBE.

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

from .providers import LEARNING_RATE, Provider
from .workload import Workload

INSTALL_HINT = ("pip install fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0 && "
                "pip install tensordict torchmetrics==1.0.3 tqdm pyre-extensions")


def _import_error(importer) -> Optional[str]:
    try:
        importer()
    except Exception as e:  # ImportError, and the OSErrors of a mismatched native library
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        return f"not importable ({type(e).__name__}: {first_line}); on CPU: {INSTALL_HINT}"
    return None


def _import_torchrec():
    from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: F401
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: F401


def _import_fbgemm():
    import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401


class TorchRecEBC(Provider):
    name = "torchrec_ebc"
    description = "torchrec.EmbeddingBagCollection (unsharded): KJT.to_dict(), then one nn.EmbeddingBag per table"

    def skip_reason(self, w: Workload) -> Optional[str]:
        return _import_error(_import_torchrec)

    def build(self, tables, w):
        from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.mode, self.keys, self.w = w.mode, w.keys, w
        data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16, "bf16": DataType.BF16}[w.dtype]
        configs = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=d, num_embeddings=w.num_embeddings,
                                      feature_names=[f"f{t}"], data_type=data_type)
                   for t, d in enumerate(w.table_dims)]
        # built on meta, then given storage: every weight is overwritten by load_state_dict
        ebc = EmbeddingBagCollection(configs, is_weighted=w.weighted, device=torch.device("meta"))
        ebc = ebc.to_empty(device=w.device)
        ebc.load_state_dict({f"embedding_bags.t{t}.weight": table for t, table in enumerate(tables)})
        self.module = ebc
        if w.mode == "train":
            self.note = "dense grads + torch.optim.SGD (the unsharded module has no sparse or fused path)"
            self.optimizer = torch.optim.SGD(ebc.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        # a fresh KJT per step (TorchRec caches its to_dict() split on the KJT object);
        # length_per_key comes from the host, as the loop's feature boundaries do
        kjt = KeyedJaggedTensor(keys=self.keys, values=batch.values, weights=batch.weights,
                                lengths=batch.lengths, offsets=batch.offsets, stride=self.w.batch_size,
                                length_per_key=batch.ids_per_feature)
        return self.module(kjt).values()


class FbgemmTBE(Provider):
    """FBGEMM's table-batched embedding bags.

    forward and train modes use ``SplitTableBatchedEmbeddingBagsCodegen`` with its fused
    ``EXACT_SGD`` (the update happens inside backward, no separate optimizer step). TBE has
    no plain dense-gradient backward, so backward mode uses FBGEMM's
    ``DenseTableBatchedEmbeddingBagsCodegen``, its table-batched ``nn.EmbeddingBag(sparse=False)``.
    """

    name = "fbgemm_tbe"
    description = "fbgemm_gpu SplitTableBatchedEmbeddingBagsCodegen (backward mode: DenseTableBatched...)"

    def skip_reason(self, w: Workload) -> Optional[str]:
        reason = _import_error(_import_fbgemm)
        if reason is None and w.device == "cpu" and w.dtype == "bf16":
            return "FBGEMM's CPU kernels have no bf16 tables"
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
                self.note = "fused EXACT_SGD inside backward (no optimizer.step)"
            place = ((EmbeddingLocation.HOST, ComputeDevice.CPU) if w.device == "cpu"
                     else (EmbeddingLocation.DEVICE, ComputeDevice.CUDA))
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                [(rows, dim, *place) for rows, dim in specs], optimizer=EmbOptimType.EXACT_SGD,
                learning_rate=LEARNING_RATE, weights_precision=precision, output_dtype=SparseType.FP32,
                pooling_mode=PoolingMode.SUM, device=torch.device(w.device))
        with torch.no_grad():
            for dst, src in zip(tbe.split_embedding_weights(), tables):
                dst.copy_(src)
        self.module = tbe

    def forward(self, batch):
        return self.module(batch.values, batch.offsets, per_sample_weights=batch.weights)
