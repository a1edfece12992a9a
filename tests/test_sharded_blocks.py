"""Placement strings of checkpoint blocks: ShardedTensor checks this rank's blocks against them."""
import torch

from jaggedrec.distributed.sharded_blocks import shard_placement


def test_own_blocks_name_the_exact_device_and_others_their_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    # ShardedTensor compares torch.device objects: cuda:1 != cuda, so this rank's must be exact
    assert shard_placement(1, 1, torch.device("cuda:1")) == "rank:1/cuda:1"
    assert shard_placement(6, 1, torch.device("cuda:1")) == "rank:6/cuda:2"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert shard_placement(0, 1, torch.device("cuda:1")) == "rank:0/cuda"
    assert shard_placement(0, 1, torch.device("cpu")) == "rank:0/cpu"
    assert shard_placement(1, 1, torch.device("cpu")) == "rank:1/cpu"
