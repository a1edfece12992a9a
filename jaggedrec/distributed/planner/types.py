"""The planner's vocabulary at TorchRec's path (``torchrec.distributed.planner.types``): what
it plans for, the ranks (``Topology``) and per-table wishes (``ParameterConstraints``), and
``PlannerError`` when no placement fits. ``ShardingPlan`` and ``ModuleSharder`` are the
sharding types' (``jaggedrec.distributed.types``), named here as TorchRec names them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from jaggedrec.distributed.types import ModuleSharder, ShardingPlan

GIB = 1 << 30


class PlannerError(ValueError):
    """No placement satisfies the memory caps and constraints."""


@dataclass
class Topology:
    """Args:
        world_size: ranks.
        compute_device: "cuda" or "cpu": which memory cap and bandwidth apply.
        local_world_size: ranks per host (default: all, one host).
        hbm_cap, ddr_cap: bytes a rank may hold on a GPU, or on the host (defaults 80 GiB, 128 GiB).
        batch_size: bags per rank per step, for the cost estimates.
        hbm_bandwidth, ddr_bandwidth: bytes/s a lookup reads at on a GPU, on a CPU.
        intra_host_bandwidth, inter_host_bandwidth: bytes/s a rank's collectives move at.
    """

    world_size: int
    compute_device: str = "cuda"
    local_world_size: Optional[int] = None
    hbm_cap: Optional[int] = None
    ddr_cap: Optional[int] = None
    batch_size: int = 512
    hbm_bandwidth: float = 2.0e12
    ddr_bandwidth: float = 5.0e10
    intra_host_bandwidth: float = 1.5e11
    inter_host_bandwidth: float = 1.25e10

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"Topology: world_size must be >= 1, got {self.world_size}")
        if self.compute_device not in ("cuda", "cpu"):
            raise ValueError(f"Topology: compute_device must be 'cuda' or 'cpu', got {self.compute_device!r}")
        if self.local_world_size is None:
            self.local_world_size = self.world_size
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(f"Topology: local_world_size {self.local_world_size} must divide world_size "
                             f"{self.world_size}")
        if self.hbm_cap is None:
            self.hbm_cap = 80 * GIB
        if self.ddr_cap is None:
            self.ddr_cap = 128 * GIB

    @property
    def memory_cap(self) -> int:
        """Bytes one rank may hold: ``hbm_cap`` on CUDA, ``ddr_cap`` on CPU."""
        return self.hbm_cap if self.compute_device == "cuda" else self.ddr_cap

    @property
    def memory_bandwidth(self) -> float:
        return self.hbm_bandwidth if self.compute_device == "cuda" else self.ddr_bandwidth

    @property
    def hosts(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def comm_bandwidth(self) -> float:
        """What a collective over every rank moves at: the slower link when there are several hosts."""
        return self.inter_host_bandwidth if self.hosts > 1 else self.intra_host_bandwidth


@dataclass
class ParameterConstraints:
    """Per-table wishes. ``sharding_types``: the ``ShardingType`` values the planner may pick
    (default: any); ``pooling_factors``: mean ids per bag of each of the table's features
    (default 1 each), for the cost estimates."""

    sharding_types: Optional[List[str]] = None
    pooling_factors: List[float] = field(default_factory=lambda: [1.0])


__all__ = ["ModuleSharder", "ParameterConstraints", "PlannerError", "ShardingPlan", "Topology"]
