"""Sharded EmbeddingBagCollection on gloo ranks against the unsharded module on the global
batch (bodies in ``sharding_cases.py``; each launch runs many cases, a spawn costs seconds)."""

import pytest

import sharding_cases
from distributed_harness import run_ranks


@pytest.mark.parametrize("world", [2, 3])
def test_forward_every_plan(world):
    checked = run_ranks(sharding_cases.forward_cases, world)
    assert checked[0] == checked[-1] and len(checked[0]) == 2 * (6 + 2)


@pytest.mark.parametrize("world", [2, 3])
def test_training_matches_global_batch(world):
    checked = run_ranks(sharding_cases.train_cases, world)
    assert checked[0] == list(sharding_cases.TRAIN_MODES)


def test_bad_input_raises_on_every_rank():
    seen = run_ranks(sharding_cases.bad_input_cases, 2, timeout=120, collective_timeout=30)
    assert seen == [["rejected", "raised", "raised"], ["raised", "rejected", "raised"]]


def test_distributed_model_parallel_trains_like_the_global_batch():
    assert run_ranks(sharding_cases.dmp_cases, 2) == [["dmp"], ["dmp"]]
