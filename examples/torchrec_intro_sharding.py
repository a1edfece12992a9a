"""The "Distributed Training and Sharding" section of TorchRec's intro tutorial, with
``torchrec`` replaced by ``jaggedrec``, on CPU ranks over gloo.

    python examples/torchrec_intro_sharding.py                          # one rank, as the tutorial
    torchrun --nproc-per-node 2 examples/torchrec_intro_sharding.py     # two ranks

Every rank passes the tutorial's batch of 2; each rank's output is that batch's pooled rows.
"""

from __future__ import annotations

import copy
import gc
import os
from typing import List

import torch
import torch.distributed as dist

import jaggedrec
from jaggedrec import JaggedTensor, KeyedJaggedTensor
from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from jaggedrec.distributed.fused_params import EmbOptimType  # FBGEMM's names, in fbgemm_gpu.split_embedding_configs
from jaggedrec.distributed.planner import EmbeddingShardingPlanner, Topology
from jaggedrec.distributed.types import LazyAwaitable, ShardingEnv
from jaggedrec.optim.optimizers import in_backward_optimizer_filter


def setup() -> None:
    # torchrun sets these; alone, this process is rank 0 of 1, as in the tutorial
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend="gloo")
    print(f"Distributed environment initialized: rank {dist.get_rank()} of {dist.get_world_size()}")


def build_ebc() -> jaggedrec.EmbeddingBagCollection:
    torch.manual_seed(0)  # the same tables on every rank
    return jaggedrec.EmbeddingBagCollection(device="cpu", tables=[
        jaggedrec.EmbeddingBagConfig(name="product_table", embedding_dim=64, num_embeddings=4096,
                                     feature_names=["product"], pooling=jaggedrec.PoolingType.SUM),
        jaggedrec.EmbeddingBagConfig(name="user_table", embedding_dim=64, num_embeddings=4096,
                                     feature_names=["user"], pooling=jaggedrec.PoolingType.SUM),
    ])


def build_kjt() -> KeyedJaggedTensor:
    product_jt = JaggedTensor(values=torch.tensor([1, 2, 3, 1, 5, 7, 9]), lengths=torch.tensor([3, 4]))
    user_jt = JaggedTensor(values=torch.tensor([2, 3, 4, 1]), lengths=torch.tensor([2, 2]))
    return KeyedJaggedTensor.from_jt_dict({"product": product_jt, "user": user_jt})


class ExampleAwaitable(LazyAwaitable[torch.Tensor]):
    def __init__(self, size: List[int]) -> None:
        super().__init__()
        self._size = size

    def _wait_impl(self) -> torch.Tensor:
        return torch.ones(self._size)


def tutorial() -> None:
    setup()
    ebc, kjt = build_ebc(), build_kjt()
    device = torch.device("cpu")

    sharder = EmbeddingBagCollectionSharder()
    pg = dist.GroupMember.WORLD
    assert pg is not None, "Process group is not initialized"
    print(f"Process Group: {pg}")

    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"))
    plan = planner.collective_plan(ebc, [sharder], pg)
    print(f"Sharding Plan generated: {plan}")

    env = ShardingEnv.from_process_group(pg)
    sharded_ebc = sharder.shard(ebc, plan.plan[""], env, device)
    print(f"Sharded EBC Module: {sharded_ebc}")

    awaitable = ExampleAwaitable([3, 2])
    print(f"ExampleAwaitable waited: {awaitable.wait().shape}")

    output = sharded_ebc(kjt)
    print(output)
    kt = output.wait()
    print(type(kt))
    print(kt.keys())
    print(kt.values().shape)
    for key, embedding in kt.to_dict().items():
        print(key, embedding.shape)
    print(f"Same rows as the unsharded module: {torch.allclose(kt.values(), ebc(kjt).values())}")

    print(sharded_ebc._input_dists)
    print(sharded_ebc._output_dists)
    print(sharded_ebc._lookups)

    model = jaggedrec.distributed.DistributedModelParallel(ebc, device=device)
    out = model(kjt)
    out.wait()
    print(model)

    # Option 1: the optimizer through the sharder's fused_params
    fused_params = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.02, "eps": 0.002}
    sharder_with_fused_params = EmbeddingBagCollectionSharder(fused_params=fused_params)
    sharded_ebc_fused_params = sharder_with_fused_params.shard(ebc, plan.plan[""], env, device)
    print(f"Original Sharded EBC fused optimizer: {sharded_ebc.fused_optimizer}")
    print(f"Sharded EBC with fused parameters fused optimizer: {sharded_ebc_fused_params.fused_optimizer}")
    print(f"Type of optimizer: {type(sharded_ebc_fused_params.fused_optimizer)}")

    # Option 2: torch's in-backward optimizer, attached before sharding
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
    ebc_apply_opt = copy.deepcopy(ebc)
    for name, param in ebc_apply_opt.named_parameters():
        print(f"{name=}")
        apply_optimizer_in_backward(torch.optim.SGD, [param], {"lr": 0.5})
    sharded_ebc_apply_opt = sharder.shard(ebc_apply_opt, plan.plan[""], env, device)
    print(sharded_ebc_apply_opt.fused_optimizer)
    print(type(sharded_ebc_apply_opt.fused_optimizer))

    print("Non Fused Model Parameters:")
    print(dict(in_backward_optimizer_filter(sharded_ebc_fused_params.named_parameters())).keys())

    ebc_output = sharded_ebc_fused_params(kjt).wait().values()
    first = torch.sum(torch.ones_like(ebc_output) - ebc_output)
    print(f"First Iteration Loss: {first}")
    first.backward()
    ebc_output = sharded_ebc_fused_params(kjt).wait().values()
    second = torch.sum(torch.ones_like(ebc_output) - ebc_output)
    # no optimizer.step(): the fused optimizer stepped inside the backward
    print(f"Second Iteration Loss: {second}")


def main() -> None:
    tutorial()
    # Every rank past its last collective before any rank tears its connections down: a rank
    # that exits while its peer is still finishing one can abort the peer inside gloo. Then the
    # modules, which hold the process group, go while the interpreter is whole: a gloo group
    # whose last reference dies during interpreter shutdown can abort the process
    # ("terminate called without an active exception", seen on torch 2.11 about 1 run in 15).
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
