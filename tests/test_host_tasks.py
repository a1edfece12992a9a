"""Pieces of CPU work on single-threaded workers (``jaggedrec.ops.host_tasks``), and the
eager train step built on them: the same bits whatever the thread count."""

import threading
import time

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.ops import fused_groups, pooled_torch
from jaggedrec.ops.host_tasks import run_pieces
from jr_testing import assert_close, random_kjt, reference_pooled


@pytest.fixture
def threads():
    """Set torch's thread count for the test; the count is restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_pieces_run_once_each_in_order_on_single_threaded_workers(threads):
    threads(2)
    seen = []

    def piece(i):
        seen.append((i, threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.002)  # long enough that a worker wakes and takes pieces too
        return i * i

    out = run_pieces([lambda i=i: piece(i) for i in range(40)])
    assert out == [i * i for i in range(40)]
    assert sorted(i for i, _, _ in seen) == list(range(40))
    # on a worker, or on the caller itself; each piece's ops on one OpenMP thread
    caller = threading.current_thread().name
    assert all((name.startswith("jaggedrec-host") or name == caller) and n == 1 for _, name, n in seen), seen[:3]
    assert any(name.startswith("jaggedrec-host") for _, name, _ in seen)
    assert torch.get_num_threads() == 2  # the caller's count is as it was


def test_one_thread_runs_the_pieces_on_the_caller(threads):
    threads(1)
    names = run_pieces([lambda: threading.current_thread().name] * 3)
    assert names == [threading.current_thread().name] * 3


def test_a_failing_piece_raises_after_the_others_ran(threads):
    threads(2)
    ran = []

    def piece(i):
        if i == 3:
            raise KeyError("piece 3")
        ran.append(i)

    with pytest.raises(KeyError, match="piece 3"):
        run_pieces([lambda i=i: piece(i) for i in range(8)])
    assert sorted(ran) == [0, 1, 2, 4, 5, 6, 7]
    assert run_pieces([lambda: 5, lambda: 6]) == [5, 6]  # the pool still serves


def test_workers_take_the_callers_grad_mode(threads):
    threads(2)
    leaf = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        out = run_pieces([lambda: (leaf * 2).requires_grad] * 4)
    assert out == [False] * 4
    assert run_pieces([lambda: (leaf * 2).requires_grad] * 4) == [True] * 4


def _train(seed: int, opt, weighted: bool, steps: int = 3):
    """A fused step over tables big enough to be many pieces: one table read by two keys,
    MEAN pooling, empty bags; returns the module and its outputs."""
    configs = [
        jr.EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=300, feature_names=["x"]),
        jr.EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=200, feature_names=["y", "x"],
                              pooling=jr.PoolingType.MEAN),
        jr.EmbeddingBagConfig(name="c", embedding_dim=5, num_embeddings=150, feature_names=["z"]),
        jr.EmbeddingBagConfig(name="d", embedding_dim=8, num_embeddings=90, feature_names=["w"]),
    ]
    torch.manual_seed(seed)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=weighted, fused_optimizer=opt)
    reference_tables = [ebc.embedding_bags[c.name].weight.detach().double().clone() for c in configs]
    gen = torch.Generator().manual_seed(seed)
    rows = {"x": 200, "y": 200, "z": 150, "w": 90}
    outs = []
    for _ in range(steps):
        batch = random_kjt(gen, ["w", "z", "y", "x"], rows, 64, max_len=12, weighted=weighted,
                           id_dtype=torch.int32)
        out = ebc(batch.kjt)
        outs.append((out.values().detach().clone(), batch))
        out.values().backward(torch.randn(out.values().shape, generator=gen))
    return ebc, outs, reference_tables


@pytest.mark.parametrize("opt", [optim.SGD(0.2), optim.RowWiseAdagrad(0.1, eps=1e-3), optim.Adam(0.05)],
                         ids=["sgd", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("weighted", [False, True])
def test_train_step_in_pieces_gives_the_same_bits_on_one_and_two_threads(opt, weighted, threads, monkeypatch):
    monkeypatch.setattr(fused_groups, "_GROUP_MIN_IDS", 1)  # every table its own piece
    monkeypatch.setattr(pooled_torch, "_PER_FEATURE_MIN_IDS", 0)  # every feature's bags a piece
    results = []
    for count in (1, 2):
        threads(count)
        results.append(_train(4, opt, weighted))
    (ebc1, outs1, tables), (ebc2, outs2, _) = results
    for (a, batch), (b, _) in zip(outs1, outs2):
        assert torch.equal(a, b)
    for name in ("a", "b", "c", "d"):
        assert torch.equal(ebc1.embedding_bags[name].weight, ebc2.embedding_bags[name].weight), name
    # and the first forward is the float64 loop's (the pieces wrote every column)
    assert_close(outs2[0][0], reference_pooled(ebc2, outs2[0][1], tables), torch.float32, "forward in pieces")
