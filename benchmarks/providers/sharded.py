"""The providers of the sharded benchmark (``jaggedrec-bench --world-size N``).

* ``jaggedrec_1proc``: the unsharded jaggedrec module in one process (rank 0) on the global
  batch, ``W * B`` bags per feature: the baseline every ratio refers to.
* ``jaggedrec_sharded``: jaggedrec's ``DistributedModelParallel`` over the W ranks, by the
  ``--sharding`` plan (``auto``: jaggedrec's planner); each rank feeds its ``B`` bags.
* ``torchrec_dmp``: TorchRec's ``DistributedModelParallel`` on the same plan (``auto``:
  TorchRec's planner), its tables on FBGEMM's TBE (compute kernel ``fused``).

Each is built from the same reference tables; ``forward(batch)`` returns this rank's
``[B, total_dim]`` rows in the unsharded column order, for the check against the reference.
Training steps use SGD with lr 0.01 fused into the backward, as the single-process benchmark
does (TorchRec's data-parallel tables have no fused kernel: dense gradients, all-reduced by
DDP, then ``torch.optim.SGD``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..workload import Batch, Workload
from .base import LEARNING_RATE, Provider
from .jaggedrec import Jaggedrec
from .peers import import_error, import_torchrec, torchrec_configs, torchrec_kjt

SHARDINGS = ("table_wise", "row_wise", "column_wise", "data_parallel", "auto")
BASELINE = "jaggedrec_1proc"


@dataclass
class RankEnv:
    """Where this rank runs: ``world`` ranks over ``group`` (None: the default group)."""

    world: int
    rank: int
    device: torch.device
    sharding: str
    group: object = None


class _Model(nn.Module):
    """The collection as a model's submodule ``ebc``, as both libraries' DMP shard it."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        return self.ebc(kjt)


def per_table_plan(helpers, sharding: str, names: List[str], world: int, kernel: Optional[str]) -> Dict[str, object]:
    """One plan generator per table from ``helpers`` (``jaggedrec.distributed.sharding_plan`` or
    TorchRec's, which take the same arguments): table ``i`` on rank ``i % W`` (table_wise), row
    blocks on every rank (row_wise), W column blocks (column_wise), or a copy on every rank."""
    kw = {"compute_kernel": kernel} if kernel else {}
    if sharding == "table_wise":
        return {n: helpers.table_wise(rank=i % world, **kw) for i, n in enumerate(names)}
    if sharding == "row_wise":
        return {n: helpers.row_wise(**kw) for n in names}
    if sharding == "column_wise":
        return {n: helpers.column_wise(ranks=list(range(world)), **kw) for n in names}
    return {n: helpers.data_parallel() for n in names}


def torchrec_plan(model: nn.Module, sharder, w: Workload, env):
    """TorchRec's plan for ``model.ebc`` (tables ``t0..``) on ``env``'s ranks: its planner's
    (collective, under ``--sharding auto``) or the hand plan ``per_table_plan`` gives."""
    from torchrec.distributed import sharding_plan
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingPlan

    if env.sharding == "auto":
        planner = EmbeddingShardingPlanner(Topology(world_size=env.world, compute_device=env.device.type),
                                           batch_size=w.batch_size // env.world)
        return planner.collective_plan(model, [sharder], env.group)
    names = [f"t{t}" for t in range(w.tables)]
    return ShardingPlan({"ebc": sharding_plan.construct_module_sharding_plan(
        model.ebc, per_table_plan(sharding_plan, env.sharding, names, env.world, "fused"),
        local_size=env.world, world_size=env.world, device_type=env.device.type)})


def plan_summary(module_plan) -> str:
    """``"table_wise x13, row_wise x13"``: how many tables each sharding type got."""
    counts = Counter(p.sharding_type for p in module_plan.values())
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))


def local_batch(batch: Batch, w: Workload, rank: int) -> Batch:
    """Rank ``rank``'s slice of a global batch: samples ``[rank * B, (rank + 1) * B)`` of every
    feature (``B = w.batch_size``), as a :class:`Batch` of ``B`` bags per feature."""
    b, tables = w.batch_size, w.tables
    global_b = batch.lengths.numel() // tables
    offsets = batch.offsets.cpu().tolist()
    values, weights, lengths, key_offsets = [], [], [], [0]
    for f in range(tables):
        first_bag = f * global_b + rank * b
        lo, hi = offsets[first_bag], offsets[first_bag + b]
        values.append(batch.values[lo:hi])
        if batch.weights is not None:
            weights.append(batch.weights[lo:hi])
        lengths.append(batch.lengths[first_bag:first_bag + b])
        key_offsets.append(key_offsets[-1] + hi - lo)
    lengths_t = torch.cat(lengths)
    counts = [hi - lo for lo, hi in zip(key_offsets[:-1], key_offsets[1:])]
    return Batch(values=torch.cat(values), lengths=lengths_t,
                 offsets=torch.nn.functional.pad(lengths_t.cumsum(0), (1, 0)),
                 weights=torch.cat(weights) if weights else None,
                 key_counts=torch.tensor(counts, device=lengths_t.device), key_offsets=key_offsets,
                 grad_out=None if batch.grad_out is None else batch.grad_out[rank * b:(rank + 1) * b])


class SingleProcess(Jaggedrec):
    """jaggedrec's unsharded module (backend auto) on the global batch, on rank 0 only."""

    def __init__(self) -> None:
        super().__init__("auto")
        self.name = BASELINE
        self.description = "jaggedrec.EmbeddingBagCollection unsharded, one process, on the global batch (W x B)"


class JaggedrecSharded(Jaggedrec):
    """jaggedrec's ``DistributedModelParallel`` over the ranks."""

    def __init__(self, env: RankEnv) -> None:
        super().__init__("auto")
        self.env = env
        self.name = "jaggedrec_sharded"
        self.description = "jaggedrec.distributed.DistributedModelParallel (auto: jaggedrec's planner)"
        self.plan = ""

    def build(self, tables, w):
        from jaggedrec.distributed import sharding_plan
        from jaggedrec.distributed.model_parallel import DistributedModelParallel
        from jaggedrec.distributed.types import ShardingEnv, ShardingPlan

        super().build(tables, w)  # the unsharded module (with fused SGD when training), then sharded
        env = self.env
        model = _Model(self.module)
        plan = None
        if env.sharding != "auto":
            names = [c.name for c in w.table_configs()]
            kernel = "fused" if w.mode == "train" else None
            plan = ShardingPlan({"ebc": sharding_plan.construct_module_sharding_plan(
                model.ebc, per_table_plan(sharding_plan, env.sharding, names, env.world, kernel),
                world_size=env.world, device_type=env.device.type)})
        self.module = DistributedModelParallel(model, env=ShardingEnv.from_process_group(env.group),
                                               device=env.device, plan=plan)
        self.plan = plan_summary(self.module.plan.plan["ebc"])

    def forward(self, batch):
        return self.module(batch.jaggedrec_kjt(self.keys)).wait().values()


class TorchRecSharded(Provider):
    """TorchRec's ``DistributedModelParallel`` over the ranks, on FBGEMM's TBE."""

    name = "torchrec_dmp"
    description = "torchrec.distributed.DistributedModelParallel, kernel fused (auto: TorchRec's planner)"

    def __init__(self, env: RankEnv) -> None:
        super().__init__()
        self.env = env
        self.plan = ""
        self._grads: Dict[int, torch.Tensor] = {}  # id(batch) -> its grad_out in TorchRec's key order

    def skip_reason(self, w: Workload) -> Optional[str]:
        reason = import_error(import_torchrec)
        if reason is None and w.device == "cpu" and w.dtype == "bf16":
            return "FBGEMM's CPU kernels have no bf16 tables"
        return reason

    def build(self, tables, w):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        env = self.env
        self.mode, self.keys, self.w = w.mode, w.keys, w
        sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD,
                                                              "learning_rate": LEARNING_RATE})
        # on meta: DMP gives the shards storage, and the tables are copied into them below
        model = _Model(EmbeddingBagCollection(torchrec_configs(w), is_weighted=w.weighted,
                                              device=torch.device("meta")))
        plan = torchrec_plan(model, sharder, w, env)
        self.module = DistributedModelParallel(model, device=env.device, plan=plan, sharders=[sharder])
        module_plan = plan.plan["ebc"]
        self.plan = plan_summary(module_plan)
        if env.sharding == "row_wise" and env.device.type == "cpu":
            self.note = ("row_wise is not among TorchRec's CPU sharding types (its sharder lists it for "
                         "CUDA only); this hand plan ran and passed the check")
        copy_tables(self.module, tables)
        dense = [t for t, p in module_plan.items() if p.sharding_type == "data_parallel"]
        if w.mode == "train" and dense:
            params = [p for n, p in self.module.named_parameters() if n.split(".")[-2] in dense]
            self.optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)
            self.note = (self.note + "; " if self.note else "") + \
                f"{len(dense)} data_parallel tables: dense grads, DDP all-reduce, torch.optim.SGD"

    def _kt(self, batch):
        return self.module(torchrec_kjt(self.keys, batch, batch.lengths.numel() // self.w.tables)).wait()

    def forward(self, batch):
        kt = self._kt(batch)  # TorchRec orders the keys by rank: back to f0, f1, ... for the check
        return torch.cat([kt[k] for k in self.keys], 1)

    def step(self, batch):
        if self.mode == "forward":
            with torch.no_grad():
                self._kt(batch)
            return
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        kt = self._kt(batch)
        kt.values().backward(self._grad(batch, kt))
        if self.optimizer is not None:
            self.optimizer.step()

    def _grad(self, batch, kt) -> torch.Tensor:
        """``batch.grad_out`` ``[B, total_dim]`` with its columns in ``kt``'s key order (made in the
        untimed warm-up step of each batch)."""
        grad = self._grads.get(id(batch))
        if grad is None:
            starts, at = {}, 0
            for k, d in zip(self.keys, self.w.table_dims):
                starts[k], at = (at, d), at + d
            cols = torch.cat([torch.arange(starts[k][0], starts[k][0] + starts[k][1]) for k in kt.keys()])
            grad = self._grads[id(batch)] = batch.grad_out.index_select(1, cols.to(batch.grad_out.device))
        return grad

    def release(self) -> None:
        super().release()
        self._grads.clear()


@torch.no_grad()
def copy_tables(dmp: nn.Module, tables) -> None:
    """Each local shard (of ``ebc.embedding_bags.t{i}.weight``) takes its block of table ``i``;
    a replicated table takes all of it."""
    for key, value in dmp.state_dict().items():
        match = re.search(r"embedding_bags\.t(\d+)\.weight$", key)
        if match is None:
            continue
        table = tables[int(match.group(1))]
        if hasattr(value, "local_shards"):  # a ShardedTensor: views of the TBE's weights
            for shard in value.local_shards():
                (r, c), (n, d) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(table[r:r + n, c:c + d])
        else:
            value.copy_(table)


def sharded_providers(env: RankEnv) -> List[Provider]:
    """The sharded benchmark's providers, the baseline first."""
    return [SingleProcess(), JaggedrecSharded(env), TorchRecSharded(env)]
