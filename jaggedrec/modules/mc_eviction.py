"""Eviction policies of :class:`~jaggedrec.modules.mc_modules.MCHManagedCollisionModule`
(TorchRec's names and constructors) and the experimental threshold filters.

A policy names the metadata it keeps per live id (``counts``: occurrences since the id was
placed; ``last_access_iter``: the last training batch that saw it) and scores ids from it; at an
eviction the ``zch_size`` best-scored ids among the live ones and the newly seen ones keep or
get a row, a live id winning ties.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch

ThresholdFilter = Callable[[torch.Tensor], Tuple[torch.Tensor, Union[float, torch.Tensor]]]


class MCHEvictionPolicyMetadataInfo(NamedTuple):
    metadata_name: str
    is_mch_metadata: bool
    is_history_metadata: bool


class MCHEvictionPolicy(abc.ABC):
    """``threshold_filtering_func``: ``[U]`` counts of the ids seen since the last eviction ->
    (``[U]`` bool mask of those allowed in, threshold). Entries of count 0 are padding (the
    history has a fixed size) and are never let in, whatever the mask says."""

    def __init__(self, metadata_info: List[MCHEvictionPolicyMetadataInfo],
                 threshold_filtering_func: Optional[ThresholdFilter] = None) -> None:
        self._metadata_info = metadata_info
        self._threshold_filtering_func = threshold_filtering_func

    @property
    def metadata_info(self) -> List[MCHEvictionPolicyMetadataInfo]:
        return self._metadata_info

    @property
    def threshold_filtering_func(self) -> Optional[ThresholdFilter]:
        return self._threshold_filtering_func

    @abc.abstractmethod
    def eviction_scores(self, current_iter: torch.Tensor, metadata: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[M]`` scores from ``[M]`` metadata (higher is kept); ``current_iter`` is ``[1]``."""


def _distance(current_iter: torch.Tensor, last_access: torch.Tensor, exponent: float) -> torch.Tensor:
    # batches since the last access, plus one, raised to the decay exponent (float32, as TorchRec)
    return torch.pow(current_iter - last_access + 1, exponent)


class LFU_EvictionPolicy(MCHEvictionPolicy):
    """Keep the ids seen most often since they were placed."""

    def __init__(self, threshold_filtering_func: Optional[ThresholdFilter] = None) -> None:
        super().__init__([MCHEvictionPolicyMetadataInfo("counts", True, False)], threshold_filtering_func)

    def eviction_scores(self, current_iter: torch.Tensor, metadata: Dict[str, torch.Tensor]) -> torch.Tensor:
        return metadata["counts"]


class LRU_EvictionPolicy(MCHEvictionPolicy):
    """Keep the ids seen most recently."""

    def __init__(self, decay_exponent: float = 1.0, threshold_filtering_func: Optional[ThresholdFilter] = None) -> None:
        super().__init__([MCHEvictionPolicyMetadataInfo("last_access_iter", True, True)], threshold_filtering_func)
        self._decay_exponent = decay_exponent

    def eviction_scores(self, current_iter: torch.Tensor, metadata: Dict[str, torch.Tensor]) -> torch.Tensor:
        return -_distance(current_iter, metadata["last_access_iter"], self._decay_exponent)


class DistanceLFU_EvictionPolicy(MCHEvictionPolicy):
    """Keep the ids with the most occurrences per (decayed) batch since their last access."""

    def __init__(self, decay_exponent: float = 1.0, threshold_filtering_func: Optional[ThresholdFilter] = None) -> None:
        super().__init__([MCHEvictionPolicyMetadataInfo("counts", True, False),
                          MCHEvictionPolicyMetadataInfo("last_access_iter", True, True)], threshold_filtering_func)
        self._decay_exponent = decay_exponent

    def eviction_scores(self, current_iter: torch.Tensor, metadata: Dict[str, torch.Tensor]) -> torch.Tensor:
        return metadata["counts"] / _distance(current_iter, metadata["last_access_iter"], self._decay_exponent)


# --- threshold filters: counts of 0 are padding, left out of every statistic ------------------
@torch.no_grad()
def dynamic_threshold_filter(id_counts: torch.Tensor, threshold_skew_multiplier: float = 10.0
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Let in ids seen more than ``threshold_skew_multiplier`` times the mean count."""
    num_ids = (id_counts > 0).sum().clamp(min=1)
    threshold = (threshold_skew_multiplier / num_ids) * id_counts.sum()
    return id_counts > threshold, threshold


@torch.no_grad()
def average_threshold_filter(id_counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Let in ids seen more often than the mean count."""
    counts = id_counts.float()
    threshold = counts.sum() / (id_counts > 0).sum().clamp(min=1)
    return counts > threshold, threshold


@torch.no_grad()
def probabilistic_threshold_filter(id_counts: torch.Tensor, per_id_probability: float = 0.01
                                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Let each id in with probability ``1 - (1 - per_id_probability) ** count``."""
    keep = torch.full_like(id_counts, 1 - per_id_probability, dtype=torch.float)
    scores = 1 - torch.pow(keep, id_counts)
    threshold = torch.rand(id_counts.size(), device=id_counts.device)
    return scores > threshold, threshold
