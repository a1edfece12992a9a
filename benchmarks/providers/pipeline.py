"""The providers of the pipeline benchmark (``jaggedrec-bench --world-size N --pipeline ...``).

A provider is one library's sharded model trained through one pipeline: ``{library}_{pipeline}``,
the library ``jaggedrec`` (``jaggedrec.distributed.DistributedModelParallel`` and
``jaggedrec.distributed.train_pipeline``) or ``torchrec`` (TorchRec's DMP and
``torchrec.distributed.train_pipeline``), the pipeline one of :data:`PIPELINES`:

* ``none``: the plain loop, one batch at a time (zero_grad, forward, backward, step);
* ``base``: ``TrainPipelineBase`` (the next batch's copy to the device on a side stream);
* ``sparse_dist``: ``TrainPipelineSparseDist`` (the copy, the sharded modules' input
  distribution of the next batch, and the current batch's forward and backward overlapped);
* ``semi_sync``: ``TrainPipelineSemiSync`` (the lookup of batch i on the weights of step i-1;
  TorchRec's with ``start_batch=0``, so it is semi-synchronous from the first step).

The model is the same small DLRM-like shape for both (:class:`TinyDLRM`): an embedding bag
collection, a dense MLP on the dense features, an MLP over both, and BCE with logits. The
tables start from the same reference rows and the dense layers from the same seed; the tables
train with row-wise Adagrad fused into the backward (jaggedrec's ``optim.RowWiseAdagrad``,
FBGEMM's ``EXACT_ROWWISE_ADAGRAD``), the dense layers with ``torch.optim.SGD``, their
gradients averaged by each DMP's ``DistributedDataParallel``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..workload import Batch, Workload
from .base import LEARNING_RATE
from .peers import import_error, import_torchrec, torchrec_configs, torchrec_kjt
from .sharded import copy_tables, per_table_plan, plan_summary, torchrec_plan

PIPELINES = ("none", "base", "sparse_dist", "semi_sync")
LIBRARIES = ("jaggedrec", "torchrec")
_CLASSES = {"base": "TrainPipelineBase", "sparse_dist": "TrainPipelineSparseDist", "semi_sync": "TrainPipelineSemiSync"}
EPS = 1e-8
HIDDEN = 32  # the MLPs' width


@dataclass
class PipelineBatch:
    """One rank's batch: ``dense_features`` [B, dense_in], ``sparse_features`` (the library's KJT
    of B bags per key), ``labels`` [B]; movable as a pipeline expects (``to``, ``record_stream``,
    ``pin_memory``), for both libraries (registered as TorchRec's ``Pipelineable``).

    ``record_stream`` does nothing for host tensors: TorchRec's semi-sync pipeline calls it on
    CPU too (with the CPU's current stream), which ``torch.Tensor.record_stream`` refuses
    ("unknown parameter type"), and TorchRec's own ``datasets.utils.Batch`` passes it on."""

    dense_features: torch.Tensor
    sparse_features: object
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "PipelineBatch":
        return PipelineBatch(self.dense_features.to(device, non_blocking=non_blocking),
                             self.sparse_features.to(device=device, non_blocking=non_blocking),
                             self.labels.to(device, non_blocking=non_blocking))

    def record_stream(self, stream) -> None:
        if not self.labels.is_cuda:
            return
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "PipelineBatch":
        return PipelineBatch(self.dense_features.pin_memory(), self.sparse_features.pin_memory(),
                             self.labels.pin_memory())


class TinyDLRM(nn.Module):
    """``ebc`` pooled per key, concatenated in ``keys`` order with the dense MLP's output, an MLP
    to one logit, BCE with logits against the labels. ``forward(batch) -> (loss, logits [B])``,
    the call shape both libraries' pipelines expect of a model."""

    def __init__(self, ebc: nn.Module, keys: List[str], pooled_dim: int, dense_in: int, seed: int) -> None:
        super().__init__()
        self.ebc, self.keys = ebc, list(keys)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same dense layers for every provider, whatever ran before
            self.dense_arch = nn.Sequential(nn.Linear(dense_in, HIDDEN), nn.ReLU())
            self.over_arch = nn.Sequential(nn.Linear(HIDDEN + pooled_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))

    def forward(self, batch):
        pooled = self.ebc(batch.sparse_features)
        # by key, not by the KeyedTensor's column order: TorchRec's sharded output orders keys by rank
        parts = [self.dense_arch(batch.dense_features)] + [pooled[k] for k in self.keys]
        logits = self.over_arch(torch.cat(parts, dim=1)).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


def dense_and_labels(w: Workload, dense_in: int, count: int, seed: int) -> List[tuple]:
    """Per global batch, ``(dense [W*B, dense_in], labels [W*B])`` drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed + 7)
    return [(torch.randn(w.batch_size, dense_in, generator=gen),
             torch.randint(0, 2, (w.batch_size,), generator=gen).float()) for _ in range(count)]


class PlainLoop:
    """The ``none`` pipeline: TorchRec's call shape over a loop without overlap."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self._model, self._optimizer, self._device = model, optimizer, device

    def progress(self, dataloader_iter: Iterator):
        batch = next(dataloader_iter).to(self._device)
        self._optimizer.zero_grad()
        loss, output = self._model(batch)
        loss.backward()
        self._optimizer.step()
        return output


def pipeline_class(library: str, pipeline: str):
    """The library's pipeline class for ``pipeline`` (``PlainLoop`` for ``none``); raises
    ImportError or AttributeError where the library has none."""
    if pipeline == "none":
        return PlainLoop
    if library == "jaggedrec":
        import jaggedrec.distributed.train_pipeline as module
    else:  # TorchRec's package exports only some of them; the module has all three
        import torchrec.distributed.train_pipeline.train_pipelines as module
    return getattr(module, _CLASSES[pipeline])


class PipelineProvider:
    """One library's model under one pipeline, on one rank."""

    def __init__(self, library: str, pipeline: str, env) -> None:
        self.library, self.pipeline, self.env = library, pipeline, env
        self.name = f"{library}_{pipeline}"
        self.description = f"{library} DMP, pipeline {pipeline}"
        self.model: Optional[nn.Module] = None
        self.runner = None
        self.plan = ""
        self.note = ""

    def skip_reason(self, w: Workload) -> Optional[str]:
        if self.library == "torchrec":
            reason = import_error(import_torchrec)
            if reason:
                return reason
        if self.library == "torchrec" and self.pipeline == "semi_sync" and w.device != "cuda":
            # its lookup stage calls record_stream on the KJTs it hands to the sharded modules,
            # which torch refuses for host tensors (RuntimeError: unknown parameter type)
            return "TorchRec's TrainPipelineSemiSync records CUDA streams on its KJTs: CUDA only"
        try:
            pipeline_class(self.library, self.pipeline)
        except Exception as e:  # ImportError, AttributeError: this library has no such pipeline (yet)
            return f"not available: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        return None

    def build(self, tables, w: Workload, dense_in: int, seed: int) -> None:
        if self.library == "jaggedrec":
            self.model = self._jaggedrec(tables, w, dense_in, seed)
        else:
            self.model = self._torchrec(tables, w, dense_in, seed)
        dense = [p for n, p in self.model.named_parameters() if ".embedding_bags." not in f".{n}"
                 and not n.startswith("ebc.")]
        self.optimizer = torch.optim.SGD(dense, lr=LEARNING_RATE)
        cls = pipeline_class(self.library, self.pipeline)
        kwargs = {}
        if self.pipeline == "semi_sync" and "start_batch" in inspect.signature(cls).parameters:
            kwargs["start_batch"] = 0  # semi-synchronous from the first step, not after TorchRec's 900
        self.runner = cls(self.model, self.optimizer, self.env.device, **kwargs)

    def _jaggedrec(self, tables, w: Workload, dense_in: int, seed: int) -> nn.Module:
        import jaggedrec as jr
        from jaggedrec import optim
        from jaggedrec.distributed import sharding_plan
        from jaggedrec.distributed.model_parallel import DistributedModelParallel
        from jaggedrec.distributed.types import ShardingEnv, ShardingPlan

        ebc = jr.EmbeddingBagCollection(w.table_configs(), is_weighted=w.weighted, device=self.env.device,
                                        fused_optimizer=optim.RowWiseAdagrad(lr=LEARNING_RATE, eps=EPS))
        loaded = ebc.load_state_dict({f"embedding_bags.t{t}.weight": x for t, x in enumerate(tables)}, strict=False)
        missing = [k for k in loaded.missing_keys if not k.startswith("fused_optimizer_state.")]
        if missing or loaded.unexpected_keys:
            raise RuntimeError(f"load_state_dict: missing {missing}, unexpected {loaded.unexpected_keys}")
        model = TinyDLRM(ebc, w.keys, w.total_dim, dense_in, seed)
        plan = None
        if self.env.sharding != "auto":
            names = [c.name for c in w.table_configs()]
            plan = ShardingPlan({"ebc": sharding_plan.construct_module_sharding_plan(
                model.ebc, per_table_plan(sharding_plan, self.env.sharding, names, self.env.world, "fused"),
                world_size=self.env.world, device_type=self.env.device.type)})
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(self.env.group),
                                       device=self.env.device, plan=plan)
        self.plan = plan_summary(dmp.plan.plan["ebc"])
        return dmp

    def _torchrec(self, tables, w: Workload, dense_in: int, seed: int) -> nn.Module:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        from torchrec.streamable import Pipelineable

        Pipelineable.register(PipelineBatch)  # TorchRec's pipelines assert isinstance(batch, Pipelineable)
        env = self.env
        sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                              "learning_rate": LEARNING_RATE, "eps": EPS})
        ebc = EmbeddingBagCollection(torchrec_configs(w), is_weighted=w.weighted, device=torch.device("meta"))
        model = TinyDLRM(ebc, w.keys, w.total_dim, dense_in, seed)
        plan = torchrec_plan(model, sharder, w, env)
        dmp = DistributedModelParallel(model, device=env.device, plan=plan, sharders=[sharder])
        self.plan = plan_summary(plan.plan["ebc"])
        copy_tables(dmp, tables)
        return dmp

    def make_batch(self, local: Batch, w: Workload, dense: torch.Tensor, labels: torch.Tensor):
        """This rank's batch in the library's types (``local``: its slice of the global ids)."""
        b = local.lengths.numel() // w.tables
        if self.library == "torchrec":
            return PipelineBatch(dense, torchrec_kjt(w.keys, local, b), labels)
        return PipelineBatch(dense, local.jaggedrec_kjt(w.keys), labels)

    def release(self) -> None:
        self.model = self.runner = self.optimizer = None


def pipeline_providers(env, pipelines, libraries=LIBRARIES) -> List[PipelineProvider]:
    """Every (library, pipeline) asked for, library by library, ``none`` first."""
    order = [p for p in PIPELINES if p in pipelines]
    return [PipelineProvider(lib, p, env) for lib in LIBRARIES if lib in libraries for p in order]
