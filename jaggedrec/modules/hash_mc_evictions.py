"""Eviction settings of :class:`~jaggedrec.modules.hash_mc_modules.HashZchManagedCollisionModule`
(TorchRec's names): a slot's metadata is the hour its id expires; a slot whose id has expired
may be taken by a new id.

The clock is :func:`now_hours` (``time.time() // 3600``), looked up at each call so that tests
can replace it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum, unique
from typing import List, Optional, Tuple

import torch

from jaggedrec.sparse.jagged_tensor import JaggedTensor, repeat_counts

__all__ = ["HashZchEvictionConfig", "HashZchEvictionModule", "HashZchEvictionPolicyName", "now_hours"]


@unique
class HashZchEvictionPolicyName(Enum):
    SINGLE_TTL_EVICTION = "SINGLE_TTL_EVICTION"
    PER_FEATURE_TTL_EVICTION = "PER_FEATURE_TTL_EVICTION"
    LRU_EVICTION = "LRU_EVICTION"


@dataclass
class HashZchEvictionConfig:
    """``single_ttl``: hours an id lives after its last access (SINGLE_TTL, LRU);
    ``per_feature_ttl``: one such number per feature of ``features`` (PER_FEATURE_TTL)."""
    features: List[str]
    single_ttl: Optional[int] = None
    per_feature_ttl: Optional[List[int]] = None


def now_hours() -> int:
    return int(time.time() / 3600)


class HashZchEvictionModule(torch.nn.Module):
    """``forward(feature)`` -> (``[N]`` int32 expiry hour of each id, the current hour): ids
    whose slot's expiry is below the current hour are expired."""

    def __init__(self, policy_name: HashZchEvictionPolicyName, device: torch.device,
                 config: Optional[HashZchEvictionConfig]) -> None:
        super().__init__()
        if config is None:
            raise ValueError(f"eviction policy {policy_name.value} needs a HashZchEvictionConfig")
        if policy_name == HashZchEvictionPolicyName.PER_FEATURE_TTL_EVICTION:
            if config.per_feature_ttl is None or len(config.per_feature_ttl) != len(config.features):
                raise ValueError("PER_FEATURE_TTL_EVICTION needs one per_feature_ttl per feature of the config, "
                                 f"got {config.per_feature_ttl} for {config.features}")
        elif config.single_ttl is None:
            raise ValueError(f"{policy_name.value} needs single_ttl in its HashZchEvictionConfig")
        self._policy_name = policy_name
        self._device = device
        self._config = config

    def forward(self, feature: JaggedTensor) -> Tuple[torch.Tensor, int]:
        now = now_hours()
        values = feature.values()
        if self._policy_name == HashZchEvictionPolicyName.PER_FEATURE_TTL_EVICTION:
            # the JaggedTensor's weights hold the number of ids of each feature, as TorchRec's
            ttl = torch.tensor(self._config.per_feature_ttl, dtype=torch.int32, device=values.device)
            split = feature.weights().to(torch.int64)
            return (repeat_counts(ttl, split, output_size=values.numel()) + now).to(torch.int32), now
        return torch.full_like(values, self._config.single_ttl + now, dtype=torch.int32), now
