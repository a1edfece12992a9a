"""Warnings for ids that the Triton kernels skipped in ``bounds_check="clamp"`` mode.

The kernels count, per feature, the ids outside their table. Reading those counts at once
would make the host wait for the GPU, so each step's counts are copied to the host without
blocking and looked at on a later step, once the copy has landed.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch

BOUNDS_CHECKS = ("raise", "clamp", "off")


class BadIdReport:
    """Holds the last step's per-feature counts until they can be read without waiting."""

    def __init__(self) -> None:
        self._pending: Optional[Tuple[torch.Tensor, Optional[torch.cuda.Event], List[str]]] = None

    def push(self, counts: torch.Tensor, names: List[str]) -> None:
        """Warn about the previous step if its counts have landed; queue this step's ``[F]`` counts."""
        self.poll()
        if counts.device.type != "cuda":
            self._warn(counts, names)  # already on the host: nothing to wait for
            return
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event, names)

    def poll(self, wait: bool = False) -> None:
        if self._pending is None:
            return
        host, event, names = self._pending
        if event is not None and not wait and not event.query():
            return
        if event is not None:
            event.synchronize()
        self._pending = None
        self._warn(host, names)

    @staticmethod
    def _warn(counts: torch.Tensor, names: List[str]) -> None:
        bad = {name: int(n) for name, n in zip(names, counts.tolist()) if n}
        if bad:
            detail = ", ".join(f"'{name}': {n}" for name, n in bad.items())
            warnings.warn(f"EmbeddingBagCollection: ids outside their table were skipped (read as zero rows); "
                          f"count per feature: {detail}", RuntimeWarning, stacklevel=3)
