"""Stochastic rounding of fp16/bf16 tables' stepped rows (``stochastic_rounding=``, FBGEMM's
option; off by default in jaggedrec): unbiased (the mean of many roundings of one value is
that value, within a tight statistical bound, where rounding to nearest is off by a fixed
fraction of an ulp), reproducible from the seed, on the torch path (eager streamed and
scattered, static) and in the Triton kernel under the interpreter; updates below half an ulp,
which rounding to nearest loses, move the rows by their expected amount.
"""

import math

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.fused_params import fused_optimizer_from_params
from jaggedrec.ops.fused_rules import stochastic_round
from test_fused_optim import TRITON, use_path

CODES = {torch.float16: 1, torch.bfloat16: 2}
MANTISSA = {torch.float16: 10, torch.bfloat16: 7}


def _ulp(x, dtype):
    exponent = max(math.floor(math.log2(abs(x))), -14 if dtype == torch.float16 else -126)
    return 2.0 ** (exponent - MANTISSA[dtype])


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("x", [1 + 0.3 * 2 ** -7, -3.7 + 0.1 * 2 ** -5, 3.3 * 2 ** -24, 2 ** -10 * (1 + 0.45 * 2 ** -7)])
def test_stochastic_rounding_is_unbiased(dtype, x):
    """The mean of 20000 roundings of ``x`` (at successive steps) is ``x`` within 5 standard
    deviations, where rounding to nearest misses it by a fixed fraction of an ulp."""
    n, ulp = 20000, _ulp(x, dtype)
    value = torch.tensor([[x]], dtype=torch.float32)
    x = value.item()  # as the fp32 step holds it
    steps = torch.arange(n).unsqueeze(1)  # one rounding per step, all at once
    rounded = stochastic_round(value.expand(n, 1).contiguous(), CODES[dtype], 11, steps).double()
    assert torch.equal(rounded.to(dtype).double(), rounded), "not a value of the dtype"
    low = math.floor(x / ulp) * ulp
    assert set(rounded.unique().tolist()) <= {low, low + ulp}, "not one of the two nearest"
    p = (x - low) / ulp
    bound = 5 * ulp * math.sqrt(p * (1 - p) / n)
    assert abs(rounded.mean().item() - x) < bound
    assert abs(value.to(dtype).double().item() - x) > 10 * bound  # rounding to nearest is biased here


@pytest.mark.parametrize("dtype", list(CODES))
def test_stochastic_rounding_keeps_exact_values_and_is_seeded(dtype):
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(64, 7, generator=gen).to(dtype).float()
    exact[0, :3] = torch.tensor([0.0, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round(exact, CODES[dtype], 5, 3), exact)
    w = torch.randn(64, 7, generator=gen)
    assert torch.equal(stochastic_round(w, CODES[dtype], 5, 3), stochastic_round(w.clone(), CODES[dtype], 5, 3))
    assert not torch.equal(stochastic_round(w, CODES[dtype], 5, 3), stochastic_round(w, CODES[dtype], 6, 3))
    assert not torch.equal(stochastic_round(w, CODES[dtype], 5, 3), stochastic_round(w, CODES[dtype], 5, 4))
    assert stochastic_round(torch.tensor([[float("nan")]]), CODES[dtype], 5, 3).isnan().all()
    assert torch.equal(stochastic_round(w, 0, 5, 3), w)  # fp32 tables: no rounding


ROWS, DIM, STEPS = 512, 3, 12
# under the interpreter each step runs the kernels program by program (~4 s a step at 512 rows):
# fewer rows and steps there, which the 5-sigma bound below accounts for
INTERPRETED_ROWS, INTERPRETED_STEPS = 64, 4


def _train(dtype, backend, rounding, seed=1, rows=ROWS, steps=STEPS):
    """SGD on one table whose ``rows`` rows all lie in [1.1, 1.9], each row stepped every one of
    ``steps`` steps by ``-lr * 1``, a third of the dtype's ulp there."""
    gen = torch.Generator().manual_seed(0)
    config = jr.EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=rows, feature_names=["x"],
                                   data_type=jr.DataType.FP16 if dtype == torch.float16 else jr.DataType.BF16)
    lr = 2.0 ** -MANTISSA[dtype] / 3
    ebc = jr.EmbeddingBagCollection([config], backend=backend, fused_optimizer=optim.SGD(
        lr, stochastic_rounding=rounding, rounding_seed=seed))
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(1.1 + torch.rand(rows, DIM, generator=gen) * 0.8)
    start = ebc.embedding_bags["t"].weight.detach().double().clone()
    ids = torch.arange(rows)
    kjt = jr.KeyedJaggedTensor.from_lengths_sync(["x"], ids, torch.ones(rows, dtype=torch.int64))
    for _ in range(steps):
        ebc(kjt).values().sum().backward()
    return ebc, start, lr


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("backend", ["torch-streamed", "torch-scattered", "torch-static", TRITON])
def test_updates_below_half_an_ulp_move_rows_as_expected(dtype, backend, monkeypatch):
    backend = use_path(monkeypatch, backend)
    size = dict(rows=INTERPRETED_ROWS, steps=INTERPRETED_STEPS) if backend == "triton" else {}
    steps = size.get("steps", STEPS)
    nearest, start, lr = _train(dtype, backend, False, **size)
    if not (backend == "triton" and dtype == torch.bfloat16):  # the interpreter's bf16 cast truncates
        assert torch.equal(nearest.embedding_bags["t"].weight.double(), start)  # lost: below half an ulp
    ebc, start, lr = _train(dtype, backend, True, **size)
    weight = ebc.embedding_bags["t"].weight.detach()
    moved = (start - weight.double()).flatten()
    n, ulp = moved.numel(), 2.0 ** -MANTISSA[dtype]
    # each element's total is a sum of `steps` roundings, each off by at most an ulp, variance <= ulp^2 / 4
    assert abs(moved.mean().item() - steps * lr) < 5 * ulp * math.sqrt(steps / 4 / n)
    again, _, _ = _train(dtype, backend, True, **size)
    assert torch.equal(again.embedding_bags["t"].weight, weight), "same seed, same bits"
    other, _, _ = _train(dtype, backend, True, seed=2, **size)
    assert not torch.equal(other.embedding_bags["t"].weight, weight)


def test_stochastic_rounding_options_and_refusals():
    assert fused_optimizer_from_params({"optimizer": "EXACT_SGD", "learning_rate": 0.1, "stochastic_rounding": True}
                                       ) == optim.SGD(0.1, stochastic_rounding=True)
    # FBGEMM's default is on; jaggedrec's stays off (see docs/training.md)
    assert not fused_optimizer_from_params({"optimizer": "EXACT_SGD", "learning_rate": 0.1}).stochastic_rounding
    with pytest.raises(ValueError, match="SGD: stochastic_rounding with max_norm"):
        optim.SGD(0.1, stochastic_rounding=True, max_norm=1.0)
    with pytest.raises(ValueError, match="RowWiseAdagrad: stochastic_rounding.*counter"):
        optim.RowWiseAdagrad(0.1, weight_decay_mode="counter", counter=optim.fused.CounterRegularization(),
                             stochastic_rounding=True)
    with pytest.raises(ValueError, match="Adam: rounding_seed"):
        optim.Adam(0.1, stochastic_rounding=True, rounding_seed=-1)
    assert repr(optim.SGD(0.1)) == "SGD(lr=0.1)"
