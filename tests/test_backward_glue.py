"""The pooled op's Triton backward, whose gradient rows and factors (bag row, per-sample
weight, MEAN's 1/length) are worked out inside ``run_index``'s marks kernel, against a float64
loop of nn.EmbeddingBag, under Triton's interpreter: the dense gradient (sorted, deterministic),
the sparse gradient and a fused SGD step, with MEAN pooling, per-sample weights, empty bags,
VBE, a key read by two tables, int32 and int64 ids; and the same bits on a second run."""

import pytest
import torch
import torch.nn.functional as F

from jaggedrec.ops import pooled
from jaggedrec.ops.feature_tables import FeatureTables

ROWS, DIMS = (7, 5, 9), (8, 16, 8)
STARTS = (0, 56, 136)
FEATURE_TABLE = (0, 1, 2, 2)  # key 1 is read by tables 1 and 2 (two passes); table 2 also by key 2
KEYS = (0, 1, 1, 2)
NUM_KEYS, WIDTH = 3, 208


def _tables(pooling):
    return FeatureTables(tuple(STARTS[t] for t in FEATURE_TABLE), tuple(ROWS[t] for t in FEATURE_TABLE),
                         tuple(DIMS[t] for t in FEATURE_TABLE), KEYS, pooling, NUM_KEYS)


def _inputs(seed, slots, id_dtype, weighted, vbe):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (NUM_KEYS * slots,), generator=gen)
    lengths[::4] = 0  # empty bags
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    n = int(offsets[-1])
    # ids valid in every table that reads them; few distinct ones, so rows repeat
    values = torch.randint(0, 5, (n,), generator=gen)
    psw = torch.rand(n, generator=gen) + 0.5 if weighted else None
    inverse = None
    if vbe:  # samples read only some slots: the ids of the others get no gradient
        inverse = torch.randint(0, max(1, slots - 1), (len(KEYS), slots + 2), generator=gen)
    return values.to(id_dtype), offsets.to(id_dtype), psw, inverse, gen


def _reference(weights, values, offsets, psw, inverse, pooling, grad_out):
    """float64: the pooled output's vector-Jacobian product for ``grad_out``, as a ``[W]``
    weight gradient, by nn.EmbeddingBag (MEAN with weights: SUM of weight / length)."""
    slots = (offsets.shape[0] - 1) // NUM_KEYS
    bags = [torch.nn.EmbeddingBag(ROWS[t], DIMS[t], mode="sum", dtype=torch.float64) for t in range(3)]
    for t, bag in enumerate(bags):
        bag.weight.data.copy_(weights[STARTS[t]:STARTS[t] + ROWS[t] * DIMS[t]].view(ROWS[t], DIMS[t]))
    outs = []
    offsets, values = offsets.long(), values.long()
    for f, (table, key) in enumerate(zip(FEATURE_TABLE, KEYS)):
        first, last = int(offsets[key * slots]), int(offsets[(key + 1) * slots])
        starts = offsets[key * slots:(key + 1) * slots] - first
        lengths = offsets[key * slots + 1:(key + 1) * slots + 1] - offsets[key * slots:(key + 1) * slots]
        ids = values[first:last]
        weight = torch.ones(ids.shape[0], dtype=torch.float64) if psw is None else psw[first:last].double()
        if pooling[f]:
            weight = weight / torch.repeat_interleave(lengths, lengths).double()
        out = bags[table](ids, starts, per_sample_weights=weight)
        outs.append(out if inverse is None else out[inverse[f]])
    (torch.cat(outs, 1) * grad_out.double()).sum().backward()
    return torch.cat([bag.weight.grad.reshape(-1) for bag in bags])


CASES = [
    # seed, slots, id dtype, per-sample weights, VBE, pooling per feature
    (0, 6, torch.int64, False, False, (0, 0, 0, 0)),
    (1, 5, torch.int32, False, False, (1, 0, 1, 1)),   # MEAN
    (2, 6, torch.int64, True, False, (0, 0, 0, 1)),    # weighted, MEAN beside SUM
    (3, 5, torch.int32, True, True, (1, 0, 0, 1)),     # VBE, weighted MEAN
    (4, 4, torch.int64, False, True, (0, 1, 0, 0)),    # VBE
]


def _case(seed, slots, id_dtype, weighted, vbe, pooling):
    """``_inputs`` plus the encoded tables, ``[W]`` fp32 weights and a ``[B, sum(dims)]`` output gradient."""
    values, offsets, psw, inverse, gen = _inputs(seed, slots, id_dtype, weighted, vbe)
    batch = slots if inverse is None else inverse.shape[1]
    weights = torch.randn(WIDTH, generator=gen)
    grad_out = torch.randn(batch, sum(DIMS[t] for t in FEATURE_TABLE), generator=gen)
    return values, offsets, psw, inverse, _tables(pooling).encode(), weights, grad_out


@pytest.mark.parametrize("seed,slots,id_dtype,weighted,vbe,pooling", CASES)
def test_dense_and_sparse_gradients(seed, slots, id_dtype, weighted, vbe, pooling):
    values, offsets, psw, inverse, tables, weights, grad_out = _case(seed, slots, id_dtype, weighted, vbe, pooling)
    want = _reference(weights.double(), values, offsets, psw, inverse, pooling, grad_out)
    assert want.abs().sum() > 0
    grads = []
    for sparse in (False, False, True):
        w = weights.clone().requires_grad_()
        out, bad = pooled.pooled_embedding_bags(w, values, offsets, psw, inverse, tables, "triton", sparse, True, 0, [])
        assert int(bad.sum()) == 0
        out.backward(grad_out)
        grads.append(w.grad.to_dense() if sparse else w.grad)
    for got in grads:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[0], grads[1])  # deterministic: the same bits run to run


@pytest.mark.parametrize("seed,slots,id_dtype,weighted,vbe,pooling", CASES[2:4])
def test_fused_sgd_step(seed, slots, id_dtype, weighted, vbe, pooling):
    """The fused step reads each contribution's gradient row and factor from the runs too."""
    values, offsets, psw, inverse, tables, weights, grad_out = _case(seed, slots, id_dtype, weighted, vbe, pooling)
    want = weights.double() - 0.5 * _reference(weights.double(), values, offsets, psw, inverse, pooling, grad_out)
    slot_grad = grad_out
    if inverse is not None:  # the op takes one gradient row per bag slot: the samples' rows summed
        slot_grad = torch.zeros(slots, grad_out.shape[1])
        column = 0
        for f, table in enumerate(FEATURE_TABLE):
            dim = DIMS[table]
            slot_grad[:, column:column + dim].index_add_(0, inverse[f], grad_out[:, column:column + dim])
            column += dim
    hparams = torch.tensor([0.5, 1e-8, 0.0, 0.9, 0.999])
    stepped = []
    for _ in range(2):
        w = weights.clone()
        pooled.pooled_embedding_bags_fused_update(slot_grad, w, values, offsets, psw, inverse, tables, "triton", 1,
                                                  hparams, torch.zeros(1, dtype=torch.int64), torch.empty(0),
                                                  torch.empty(0))
        stepped.append(w)
    torch.testing.assert_close(stepped[0].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(stepped[0], stepped[1])
