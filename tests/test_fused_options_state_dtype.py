"""Optimizer state kept in fp16/bf16 (``state_dtype=``, FBGEMM's ``optimizer_state_dtypes``):
the step reads the state as fp32, updates it, steps the row with the fp32 values and stores
the state rounded to nearest. Against the float64 reference of ``test_fused_optim`` whose state
is rounded to the same dtype after every step; on the eager (streamed and scattered) and
static torch steps and the Triton kernel under the interpreter; untouched rows and their state
bit for bit; checkpoints keep the dtype; fused_params' mapping and refusals.
"""

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.distributed.fused_params import fused_optimizer_from_params
from test_fused_optim import TRITON, Reference, use_path
from jr_testing import assert_close, random_kjt

OPTIMIZERS = {
    "rowwise_adagrad": lambda d: optim.RowWiseAdagrad(lr=0.2, eps=1e-6, weight_decay=0.01, state_dtype=d),
    "adam": lambda d: optim.Adam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, state_dtype=d),
    "adagrad": lambda d: optim.Adagrad(lr=0.2, eps=1e-6, weight_decay=0.01, state_dtype=d),
    "partial_rowwise_adam": lambda d: optim.PartialRowWiseAdam(lr=0.05, betas=(0.8, 0.95), eps=1e-6,
                                                               weight_decay=0.02, state_dtype=d),
    "lamb": lambda d: optim.LAMB(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02, state_dtype=d),
    "lars_sgd": lambda d: optim.LarsSGD(lr=0.3, eta=0.2, momentum=0.8, weight_decay=0.01, state_dtype=d),
}
# the reference's state names beside the collection's buffers (one table: one storage group)
_NAMES = {"sum_sq": "sum_sq", "exp_avg": "m", "exp_avg_sq": "v", "momentum1": "m"}
DTYPES = [torch.float16, torch.bfloat16]


def _configs(dim):
    # one table read by two features: duplicate ids within and across the keys
    return [jr.EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=13, feature_names=["x", "y"])]


def _train(opt, backend, dim=5, steps=6):
    torch.manual_seed(0)
    configs = _configs(dim)
    ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, backend=backend, fused_optimizer=opt)
    ref = Reference(ebc, opt, configs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        b = random_kjt(gen, ["y", "x"], {"x": 13, "y": 13}, 4, max_len=3, weighted=True)
        out = ebc(b.kjt)
        upstream = torch.randn(out.values().shape, generator=gen, dtype=torch.float64)
        expected = ref.step(ebc, b, upstream, opt.lr)
        for s in ref.state:  # the reference keeps its state rounded as the collection stores it
            for key, value in s.items():
                s[key] = value.to(opt.state_dtype).double()
        assert_close(out.values(), expected, what="forward")
        (out.values() * upstream.float()).sum().backward()
    return ebc, ref


def _state(opt, ebc, ref, name):
    """The collection's buffer and the reference's state of that name, both ``[rows, ...]``."""
    buffer = getattr(ebc.fused_optimizer_state, f"fp32_{name}")
    key = _NAMES.get(name) or ("sum_sq" if buffer.numel() == ref.tables[0].shape[0] else "v")
    expected = ref.state[0][key]
    return buffer.view(expected.shape), expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["torch-streamed", "torch-scattered", "torch-static", TRITON])
def test_state_in_half_precision_matches_rounded_float64_reference(name, dtype, backend, monkeypatch):
    opt = OPTIMIZERS[name](dtype)
    ebc, ref = _train(opt, use_path(monkeypatch, backend))
    weight = ebc.embedding_bags["t"].weight.detach()
    touched = ref.ever_touched[0]
    assert not touched.all() and touched.any()
    assert_close(weight, ref.tables[0], what=f"{name} rows")
    assert torch.equal(weight[~touched].double(), ref.initial[0][~touched]), "untouched rows"
    for state_name, _ in opt.state:
        got, expected = _state(opt, ebc, ref, state_name)
        assert got.dtype == dtype, state_name
        assert_close(got.float(), expected, dtype, what=state_name)
        assert not got[~touched].any(), f"{state_name}: untouched rows' state"


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["adam", "partial_rowwise_adam", "rowwise_adagrad"])
def test_triton_kernel_equals_torch_path_with_half_state(name, monkeypatch):
    """Rows past one kernel tile (130 columns): the kernel's fp16 state and rows as the torch
    path's, to the state's rounding."""
    opt = OPTIMIZERS[name](torch.float16)
    triton_ebc, _ = _train(opt, "triton", dim=130, steps=3)
    torch_ebc, _ = _train(opt, "torch", dim=130, steps=3)
    for (key, a), (_, b) in zip(triton_ebc.state_dict().items(), torch_ebc.state_dict().items()):
        assert a.dtype == b.dtype, key
        assert_close(a.float(), b.float(), a.dtype if a.dtype == torch.float16 else torch.float32, what=key)


@pytest.mark.parametrize("dtype", DTYPES)
def test_checkpoint_keeps_the_state_dtype_and_resumes(dtype):
    opt = OPTIMIZERS["adam"](dtype)
    trained, _ = _train(opt, "torch", steps=3)
    state = trained.state_dict()
    assert state["fused_optimizer_state.fp32_exp_avg"].dtype == dtype
    fresh = jr.EmbeddingBagCollection(_configs(5), is_weighted=True, fused_optimizer=opt)
    fresh.load_state_dict(state)
    gen = torch.Generator().manual_seed(7)
    b = random_kjt(gen, ["x", "y"], {"x": 13, "y": 13}, 4, max_len=3, weighted=True)
    for ebc in (trained, fresh):
        ebc(b.kjt).values().sum().backward()
    for (key, a), (_, c) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == c.dtype and torch.equal(a, c), key


def test_state_dtype_through_fused_params_and_refusals():
    fp16 = pytest.importorskip("fbgemm_gpu.split_embedding_configs").SparseType.FP16
    assert fused_optimizer_from_params({"optimizer": "EXACT_ROWWISE_ADAGRAD", "learning_rate": 0.1,
                                        "optimizer_state_dtypes": {"momentum1": fp16}}).state_dtype == torch.float16
    adam = fused_optimizer_from_params({"optimizer": "ADAM", "optimizer_state_dtypes": {"momentum1": "bf16",
                                                                                        "momentum2": "BF16"}})
    assert adam == optim.Adam(0.01, state_dtype=torch.bfloat16)
    assert fused_optimizer_from_params({"optimizer": "ADAM", "optimizer_state_dtypes": {"momentum1": "fp32"}}
                                       ).state_dtype is None
    refused = [
        ({"optimizer": "ADAM", "optimizer_state_dtypes": {"momentum1": "fp16"}}, "differ"),
        ({"optimizer": "EXACT_ADAGRAD", "optimizer_state_dtypes": {"momentum2": "fp16"}}, "momentum2"),
        ({"optimizer": "EXACT_SGD", "optimizer_state_dtypes": {"momentum1": "fp16"}}, "SGD"),
        ({"optimizer": "EXACT_ADAGRAD", "optimizer_state_dtypes": {"momentum1": "int8"}}, "int8"),
    ]
    for params, needle in refused:
        with pytest.raises(ValueError, match=needle):
            fused_optimizer_from_params(params)
    with pytest.raises(ValueError, match="SGD.*state_dtype|state_dtype.*SGD"):
        optim.SGD(0.1, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        optim.Adam(0.1, state_dtype=torch.int8)
    with pytest.raises(ValueError, match="RowWiseAdagrad.*state_dtype.*counter"):
        optim.RowWiseAdagrad(0.1, weight_decay_mode="counter", counter=optim.fused.CounterRegularization(),
                             state_dtype=torch.float16)
    assert repr(optim.Adam(0.1)) == "Adam(lr=0.1, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0)"
