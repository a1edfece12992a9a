"""Named workloads (``--preset``), each sized for the device it runs on.

A preset is a list of configurations (a sweep when there are several), given as
``Workload`` fields; command-line flags then override any field. CPU sizes finish in
seconds to a minute on a 2-core machine; CUDA sizes fit an 80 GB GPU with every provider
holding its own copy of the tables (about 6.7 GB each for ``dlrm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from .workload import Workload

DEFAULT_PRESET = "dlrm"


@dataclass(frozen=True)
class Preset:
    description: str
    cpu: Tuple[Dict[str, object], ...]
    cuda: Tuple[Dict[str, object], ...]


def _sweep(base: Dict[str, object], field: str, values) -> Tuple[Dict[str, object], ...]:
    return tuple(dict(base, **{field: v}) for v in values)


_MIXED_DIMS = (4, 16, 64, 128, 7, 130)

PRESETS: Dict[str, Preset] = {
    "tutorial": Preset(
        "the TorchRec tutorial's two tables (product, user): 4096 rows, dim 64",
        cpu=(dict(tables=2, num_embeddings=4096, dims=(64,), batch_size=1024, pooling_factor=3, bag_size="random"),),
        cuda=(dict(tables=2, num_embeddings=4096, dims=(64,), batch_size=8192, pooling_factor=3,
                   bag_size="random"),),
    ),
    "dlrm": Preset(
        "26 Criteo-like tables, one id per bag",
        cpu=(dict(tables=26, num_embeddings=100_000, dims=(64,), batch_size=4096, pooling_factor=1,
                  bag_size="fixed"),),
        cuda=(dict(tables=26, num_embeddings=500_000, dims=(128,), batch_size=16384, pooling_factor=1,
                   bag_size="fixed"),),
    ),
    "pooling": Preset(
        "long bags: 20, 50 and 100 ids per bag on average (some empty)",
        cpu=_sweep(dict(tables=8, num_embeddings=100_000, dims=(64,), batch_size=1024, bag_size="random"),
                   "pooling_factor", (20, 50, 100)),
        cuda=_sweep(dict(tables=26, num_embeddings=500_000, dims=(128,), batch_size=2048, bag_size="random"),
                    "pooling_factor", (20, 50, 100)),
    ),
    "scaling": Preset(
        "10, 100 and 1000 tables: where the per-table loop's overhead shows",
        cpu=_sweep(dict(num_embeddings=10_000, dims=(32,), batch_size=512, pooling_factor=5, bag_size="random"),
                   "tables", (10, 100, 1000)),
        cuda=_sweep(dict(num_embeddings=20_000, dims=(64,), batch_size=1024, pooling_factor=10, bag_size="random"),
                    "tables", (10, 100, 1000)),
    ),
    "mixed-dims": Preset(
        f"12 tables cycling through dims {list(_MIXED_DIMS)}, odd sizes included",
        cpu=(dict(tables=12, num_embeddings=50_000, dims=_MIXED_DIMS, batch_size=2048, pooling_factor=10,
                  bag_size="random"),),
        cuda=(dict(tables=12, num_embeddings=500_000, dims=_MIXED_DIMS, batch_size=8192, pooling_factor=10,
                   bag_size="random"),),
    ),
    "vbe": Preset(
        "a user feature (f0, 20 ids per bag) shared by the samples of each of 256 users in a batch of 4096: "
        "jaggedrec_vbe pools each user's bag once (VBE), the others the expanded batch; 1 and 8 tables",
        cpu=_sweep(dict(num_embeddings=100_000, dims=(64,), batch_size=4096, pooling_factor=20, bag_size="random",
                        vbe_users=256), "tables", (1, 8)),
        cuda=_sweep(dict(num_embeddings=500_000, dims=(128,), batch_size=16384, pooling_factor=20,
                         bag_size="random", vbe_users=1024), "tables", (1, 8)),
    ),
}


def preset_workloads(name: str, device: str) -> List[Workload]:
    """The preset's configurations for ``device`` (``"cpu"`` or ``"cuda"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    configs = preset.cuda if device == "cuda" else preset.cpu
    return [Workload(device=device, **c) for c in configs]
