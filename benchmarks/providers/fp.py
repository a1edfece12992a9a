"""``--module fpebc``: position-weighted features (``FeatureProcessedEmbeddingBagCollection``)
beside the plain collections they are built on, on the same unweighted batches.

Every feature gets position weights (``PositionWeightedModuleCollection``, one
``[max_feature_length]`` vector per feature, longer than the workload's longest bag). They
start at 1, as TorchRec's do, so every provider's output equals the unweighted loop's and the
runner checks them all against it; the timed work is the same as with any other values. In
train mode the tables step with jaggedrec's fused SGD (TorchRec's: dense SGD) and the position
weights with ``torch.optim.SGD``, as dense parameters.

- ``jaggedrec[torch]``: the unweighted collection, what the position weights are measured against;
- ``jaggedrec_weighted``: the weighted collection fed ready-made ``[N]`` weights (made before
  the timed step: what a weighted lookup alone costs);
- ``jaggedrec_fpebc``: jaggedrec's FPEBC (the weights made from positions in the step);
- ``torchrec_fpebc`` and ``torchrec_ebc``: TorchRec's FPEBC and unweighted collection.

The CPU forward's floor against ``jaggedrec[torch]`` (issue 25 asks for 1.05x): torch's
``embedding_bag`` reads only per-id weights, so the FPEBC pools as ``jaggedrec_weighted`` does
(1.02-1.04x) after building the ``[N]`` weights, which takes at least two passes over the ids:
a running sum that numbers each id within its bag (0.044-0.049x) and a gather of the position
weights by that number (0.049-0.057x). On the 2-core Xeon, one thread, thread CPU time,
loaded, one copy of the tables for every row, that floor is 1.146x, 1.131x and 1.111x at 20, 50
and 100 ids per bag; the FPEBC measured 1.255x, 1.222x and 1.170x (the rest: filling the running
sum's steps, the per-bag steps, the module's key table, bag-length check and weighted KJT)::

    .venv/bin/python benchmarks/results/cpu-xeon-2core-2026-12-06-fpebc-floor/floor_parts.py 60 20 50 100

Going below it needs the weight read by position inside the pooling loop (the Triton kernels
do; on the CPU that is a kernel of our own). This module's wall-clock rows give each provider
its own copy of the tables, which on a loaded machine moved the unweighted and weighted rows
up to ~25% apart at 20 ids per bag: read their ratios with that in mind.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

import jaggedrec as jr

from ..workload import Workload
from .base import LEARNING_RATE, Provider
from .jaggedrec import Jaggedrec
from .loops import EmbeddingBagLoop
from .peers import TorchRecEBC, import_error, import_torchrec, torchrec_configs, torchrec_kjt


def max_feature_length(w: Workload) -> int:
    """Longer than any bag the workload draws (random bags hold up to ``int(2 * pooling_factor)``)."""
    return int(2 * w.pooling_factor) + 1


def _skip_weighted(w: Workload) -> Optional[str]:
    if w.weighted:
        return "--weighted: the position weights replace the batch's weights; run without --weighted"
    if w.vbe_users:
        return "no VBE lineup here (--vbe-users)"
    return None


def _load_tables(module, tables, prefix: str = "") -> None:
    loaded = module.load_state_dict({f"{prefix}embedding_bags.t{t}.weight": table for t, table in enumerate(tables)},
                                    strict=False)
    missing = [k for k in loaded.missing_keys if "fused_optimizer_state." not in k and "position_weight" not in k]
    if missing or loaded.unexpected_keys:
        raise RuntimeError(f"load_state_dict: missing {missing}, unexpected {loaded.unexpected_keys}")


class JaggedrecWeighted(Jaggedrec):
    """The weighted collection with ``[N]`` weights of 1 made outside the timed step."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.name = "jaggedrec_weighted"
        self.description = "jaggedrec.EmbeddingBagCollection(is_weighted=True), per-id weights given"
        self._ones: Dict[int, torch.Tensor] = {}

    def skip_reason(self, w):
        return _skip_weighted(w)

    def build(self, tables, w):
        super().build(tables, w.replace(weighted=True))

    def forward(self, batch):
        ones = self._ones.get(id(batch))
        if ones is None:
            ones = self._ones[id(batch)] = torch.ones(batch.values.shape[0], device=batch.values.device)
        kjt = jr.KeyedJaggedTensor(self.keys, batch.values, ones, lengths=batch.lengths, offsets=batch.offsets)
        return self.module(kjt).values()


class JaggedrecFPEBC(Provider):
    name = "jaggedrec_fpebc"
    description = ("jaggedrec FeatureProcessedEmbeddingBagCollection over a PositionWeightedModuleCollection "
                   "(one gather of position weights, then the weighted collection)")

    def skip_reason(self, w):
        return _skip_weighted(w)

    def build(self, tables, w):
        from jaggedrec.modules.feature_processor_ import PositionWeightedModuleCollection
        from jaggedrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

        self.mode, self.keys = w.mode, w.keys
        fused = None
        if w.mode == "train":
            from jaggedrec import optim

            fused = optim.SGD(lr=LEARNING_RATE)
            self.note = "fused SGD on the tables, torch.optim.SGD on the position weights"
        ebc = jr.EmbeddingBagCollection(w.replace(weighted=True).table_configs(), is_weighted=True, device=w.device,
                                        backend="torch", fused_optimizer=fused)
        processors = PositionWeightedModuleCollection({k: max_feature_length(w) for k in w.keys}, device=w.device)
        self.module = FeatureProcessedEmbeddingBagCollection(ebc, processors)
        _load_tables(self.module, tables, "_embedding_bag_collection.")
        if w.mode == "train":
            self.optimizer = torch.optim.SGD(processors.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        return self.module(batch.jaggedrec_kjt(self.keys)).values()


class TorchRecFPEBC(Provider):
    name = "torchrec_fpebc"
    description = ("torchrec FeatureProcessedEmbeddingBagCollection over a PositionWeightedModuleCollection "
                   "(offsets_range, a gather per feature, then the weighted collection)")

    def skip_reason(self, w):
        return _skip_weighted(w) or import_error(import_torchrec)

    def build(self, tables, w):
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
        from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

        self.mode, self.keys, self.w = w.mode, w.keys, w
        ebc = EmbeddingBagCollection(torchrec_configs(w), is_weighted=True, device=torch.device("meta"))
        ebc = ebc.to_empty(device=w.device)
        processors = PositionWeightedModuleCollection({k: max_feature_length(w) for k in w.keys},
                                                      device=torch.device(w.device))
        self.module = FeatureProcessedEmbeddingBagCollection(ebc, processors)
        _load_tables(self.module, tables, "_embedding_bag_collection.")
        if w.mode == "train":
            self.note = "dense grads + torch.optim.SGD (tables and position weights)"
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LEARNING_RATE)

    def forward(self, batch):
        return self.module(torchrec_kjt(self.keys, batch, self.w.batch_size)).values()


def fp_providers() -> List[Provider]:
    """``--module fpebc``'s providers; the ``eb_loop`` baseline first."""
    return [EmbeddingBagLoop(), Jaggedrec("torch"), JaggedrecWeighted(), JaggedrecFPEBC(), TorchRecFPEBC(),
            TorchRecEBC()]
