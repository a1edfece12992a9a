"""The eager CPU training path of the bag collection skips the dispatcher: with a gradient to
come, ``run_pooled_embedding_bags`` runs the op's body and backward through a plain
``torch.autograd.Function`` (``pooled._EagerPooled``) instead of the ``jaggedrec::`` ops.

Checked here: that no ``jaggedrec::`` op runs in such a step, and that the outputs, dense,
sparse and per-sample-weight gradients, and fused optimizer steps are the same bits as the
op path gives (forced by replacing the Function with the op), on seeded batches with empty
bags, duplicate ids, shuffled keys, a feature read by two tables, MEAN pooling, int32 and
int64 ids, and a VBE batch; and a fused SGD step against a float64 loop of nn.EmbeddingBag."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.ops import pooled

from jr_testing import assert_close, key_rows, random_configs, random_kjt, shuffled_keys


class _ThroughOp:
    """Stands in for ``pooled._EagerPooled``: the call goes through the op, as before."""

    @staticmethod
    def apply(*args):
        split = pooled._OPTIMIZER_STATE_ARG
        return pooled.pooled_embedding_bags(*args[:split], list(args[split:]))


def _refuse(*args, **kwargs):
    raise AssertionError("the eager CPU step went through the jaggedrec::pooled_embedding_bags op")


def _batch(seed, weighted, id_dtype, use_offsets, configs):
    gen = torch.Generator().manual_seed(seed)
    rows = key_rows(configs)
    keys = shuffled_keys(gen, list(rows))
    return random_kjt(gen, keys, rows, batch=6, weighted=weighted, id_dtype=id_dtype, use_offsets=use_offsets)


def _step(ebc, kjt, psw_grad: bool):
    """Forward and backward of a seeded output gradient; returns what autograd and the step left."""
    if psw_grad:
        kjt = jr.KeyedJaggedTensor(kjt.keys(), kjt.values(), kjt.weights().clone().requires_grad_(), kjt.lengths())
    out = ebc(kjt).values()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(grad_out)
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()) for n, p in ebc.named_parameters()
             if p.grad is not None}
    state = {k: v.clone() for k, v in ebc.state_dict().items()}
    return out.detach(), grads, state, (kjt.weights().grad if psw_grad else None)


def _same_bits(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _same_bits(a[k], b[k], f"{what}[{k}]")
    elif a is None:
        assert b is None, what
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what


CASES = [  # (seed, fused optimizer, sparse, weighted and its gradient, ids, offsets given)
    (0, None, False, False, torch.int64, False),
    (1, None, True, False, torch.int32, True),
    (2, None, False, True, torch.int64, False),
    (3, optim.SGD(lr=0.1), False, False, torch.int64, True),
    (4, optim.SGD(lr=0.1), False, True, torch.int32, False),
    (5, optim.RowWiseAdagrad(lr=0.1), False, False, torch.int64, False),
    (6, optim.Adam(lr=0.1), False, True, torch.int32, True),
]


@pytest.mark.parametrize("seed,fused,sparse,weighted,id_dtype,use_offsets", CASES)
def test_eager_step_matches_the_op_bit_for_bit(monkeypatch, seed, fused, sparse, weighted, id_dtype, use_offsets):
    torch.manual_seed(seed)
    configs = random_configs(torch.Generator().manual_seed(seed), dims=(4, 8, 4))
    built = jr.EmbeddingBagCollection(configs, is_weighted=weighted, backend="torch", sparse=sparse,
                                      fused_optimizer=fused)
    kjt = _batch(seed, weighted, id_dtype, use_offsets, configs).kjt
    psw_grad = weighted and fused is None
    results = []
    for through_op in (True, False, False):  # the op, then the eager path twice (a second step too)
        ebc = copy.deepcopy(built)
        with monkeypatch.context() as m:
            if through_op:
                m.setattr(pooled, "_EagerPooled", _ThroughOp)
            else:
                m.setattr(pooled, "pooled_embedding_bags", _refuse)
            results.append(_step(ebc, kjt, psw_grad))
            if not through_op:
                _step(ebc, kjt, psw_grad)  # state carried from step to step stays the same too
                results[-1] = results[-1] + (ebc.state_dict(),)
    for what, a, b in zip(("output", "grads", "state", "psw grad"), results[0], results[1]):
        _same_bits(a, b, what)
    _same_bits(results[1][4], results[2][4], "second step")


def test_eager_vbe_step_matches_the_op(monkeypatch):
    configs = [jr.EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=11, feature_names=["u"]),
               jr.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=7, feature_names=["i"],
                                     pooling=jr.PoolingType.MEAN)]
    torch.manual_seed(3)
    built = jr.EmbeddingBagCollection(configs, backend="torch", fused_optimizer=optim.SGD(lr=0.5))
    gen = torch.Generator().manual_seed(3)
    # "u": 2 bags shared by the 5 samples, "i": one bag each (one empty)
    lengths = torch.tensor([2, 3, 1, 0, 2, 4, 1])
    values = torch.cat([torch.randint(0, 11, (5,), generator=gen), torch.randint(0, 7, (8,), generator=gen)])
    inverse = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 2, 3, 4]])
    kjt = jr.KeyedJaggedTensor(["u", "i"], values, lengths=lengths, stride_per_key_per_rank=[[2], [5]],
                               inverse_indices=(["u", "i"], inverse))
    outs = []
    for through_op in (True, False):
        ebc = copy.deepcopy(built)
        with monkeypatch.context() as m:
            m.setattr(*((pooled, "_EagerPooled", _ThroughOp) if through_op else (pooled, "pooled_embedding_bags",
                                                                                 _refuse)))
            out = ebc(kjt).values()
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        outs.append((out.detach(), ebc.state_dict()))
    _same_bits(outs[0][0], outs[1][0], "output")
    _same_bits(outs[0][1], outs[1][1], "state")


def test_eager_fused_sgd_against_embedding_bag_loop():
    """The tutorial's shape, scaled down: two tables, shuffled keys, a fused SGD step, against
    a float64 loop of nn.EmbeddingBag and the step written out (duplicate ids summed)."""
    lr = 0.25
    configs = [jr.EmbeddingBagConfig(name=f"t{t}", embedding_dim=8, num_embeddings=13, feature_names=[f"f{t}"])
               for t in range(2)]
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(configs, backend="torch", fused_optimizer=optim.SGD(lr=lr))
    before = [ebc.embedding_bags[f"t{t}"].weight.detach().double().clone() for t in range(2)]
    gen = torch.Generator().manual_seed(5)
    batch = random_kjt(gen, ["f1", "f0"], {"f0": 13, "f1": 13}, batch=9, id_dtype=torch.int32)
    out = ebc(batch.kjt).values()
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    tables = [t.clone().requires_grad_() for t in before]
    ref = []
    for t in range(2):
        values, lengths, _ = batch.per_key[f"f{t}"]
        ref.append(F.embedding_bag(values.long(), tables[t], F.pad(lengths.cumsum(0), (1, 0)), mode="sum",
                                   include_last_offset=True))
    ref = torch.cat(ref, 1)
    assert_close(out.detach(), ref.detach(), what="output")
    (ref * grad_out.double()).sum().backward()
    for t in range(2):
        assert_close(ebc.embedding_bags[f"t{t}"].weight.detach(), before[t] - lr * tables[t].grad, what=f"t{t}")
