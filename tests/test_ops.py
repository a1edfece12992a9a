"""torch.library.opcheck on every jaggedrec op, on CPU tensors."""

import pytest
import torch

import jaggedrec  # noqa: F401  (registers the ops)
from jaggedrec.ops import pooled_plan
from jaggedrec.ops.feature_tables import FeatureTables, feature_tables

OPS = torch.ops.jaggedrec


def _args(gen, weighted, id_dtype=torch.int64, mean=True):
    # three features over two tables of dims 3 and 5 in one flat tensor; key 1 is read twice
    dims, rows = [3, 5, 5], [4, 6, 6]
    weight_offsets = [0, 32, 32]
    weights = torch.randn(32 + 30, generator=gen, requires_grad=True)
    num_keys = 2  # batch 3
    lengths = torch.tensor([2, 0, 3, 1, 2, 0])
    values = torch.cat([torch.randint(0, 4, (5,), generator=gen), torch.randint(0, 6, (3,), generator=gen)]).to(id_dtype)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
    psw = torch.rand(8, generator=gen, requires_grad=True) if weighted else None
    pooling = [1 if mean else 0, 0, 1 if mean else 0]
    tables = FeatureTables(tuple(weight_offsets), tuple(rows), tuple(dims), (0, 1, 1), tuple(pooling), num_keys)
    # (..., inverse_indices, tables, backend, sparse_grad, deterministic, optimizer, optimizer_state)
    return weights, values, offsets, psw, None, tables.encode(), "torch", False, True, 0, []


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_opcheck_pooled_forward(weighted, id_dtype):
    gen = torch.Generator().manual_seed(0)
    torch.library.opcheck(OPS.pooled_embedding_bags, _args(gen, weighted, id_dtype))


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_pooled_backward(weighted):
    gen = torch.Generator().manual_seed(1)
    weights, values, offsets, psw, *static = _args(gen, weighted)
    grad_out = torch.randn(3, 13, generator=gen)
    args = (grad_out, weights.detach(), values, offsets, None if psw is None else psw.detach(), *static[1:3],
            True, weighted, True)
    torch.library.opcheck(OPS.pooled_embedding_bags_backward, args)


def _fused_args(gen, optimizer, weighted, backend="torch"):
    weights, values, offsets, psw, _, tables, *_ = _args(gen, weighted)
    grad_out = torch.randn(3, 13, generator=gen)
    total_rows = 4 + 6  # tables of 4 and 6 rows; features 1 and 2 share the second
    state1 = torch.rand(total_rows if optimizer == 2 else weights.numel() if optimizer == 3 else 0, generator=gen)
    state2 = torch.rand(weights.numel() if optimizer == 3 else 0, generator=gen)
    hparams = torch.tensor([0.1, 1e-6, 0.01, 0.9, 0.99])
    step = torch.tensor([3], dtype=torch.int64)
    return (grad_out, weights.detach(), values, offsets, None if psw is None else psw.detach(), None, tables, backend,
            optimizer, hparams, step, state1, state2)


@pytest.mark.parametrize("optimizer", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_fused_update(optimizer, weighted):
    gen = torch.Generator().manual_seed(2)
    args = _fused_args(gen, optimizer, weighted)
    torch.library.opcheck(OPS.pooled_embedding_bags_fused_update, args)
    # the CPU update inside it, which compiled graphs call without tracing into it
    torch.library.opcheck(OPS.pooled_embedding_bags_fused_update_host, args[:7] + args[8:])


def test_plan_splits_shared_keys_into_passes():
    plan = pooled_plan.make_plan((0, 32, 32), (4, 6, 6), (3, 5, 5), (0, 1, 1), (0, 0, 0), 2)
    # dim 3 alone; dim 5 has key 1 twice, so it needs two passes
    assert [(p.dim, p.features) for p in plan.passes] == [(3, (0,)), (5, (1,)), (5, (2,))]
    assert plan.out_offsets == (0, 3, 8, 13) and plan.feature_rows == (4, 6, 6)
    with pytest.raises(ValueError, match="not row-aligned"):
        pooled_plan.make_plan((0, 7), (4, 6), (5, 5), (0, 1), (0, 0), 2)


def test_feature_tables_round_trip_and_reject_bad_encodings():
    tables = FeatureTables((0, 32, 32), (4, 6, 6), (3, 5, 5), (1, 0, 0), (0, 1, 0), 2)
    assert feature_tables(tables.encode()) == tables
    assert tables.row_bases == (0, 4, 4)  # the two features of the second table share its state rows
    assert tables.meta(torch.empty(0)).tolist()[1] == [32, 5, 6, 3, 0, 1, 4]
    with pytest.raises(ValueError, match="not an encoded"):
        feature_tables([2, 2, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        FeatureTables((0,), (4,), (3,), (2,), (0,), 2)


def _to_cuda_triton(args):
    moved = [a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    moved[6] = "triton"
    return tuple(moved)


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_triton_ops_on_gpu(weighted):
    gen = torch.Generator().manual_seed(2)
    torch.library.opcheck(OPS.pooled_embedding_bags, _to_cuda_triton(_args(gen, weighted)))
    weights, values, offsets, psw, *static = _to_cuda_triton(_args(gen, weighted))
    grad_out = torch.randn(3, 13, device="cuda")
    args = (grad_out, weights.detach(), values, offsets, None if psw is None else psw.detach(), *static[1:3],
            True, weighted, True)
    torch.library.opcheck(OPS.pooled_embedding_bags_backward, args)
    for optimizer in (1, 2, 3):
        fused = _fused_args(gen, optimizer, weighted, backend="triton")
        torch.library.opcheck(OPS.pooled_embedding_bags_fused_update,
                              tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in fused))


def _sequence_args(gen, id_dtype=torch.int64):
    # the same two tables; key 1 read twice, key 0 has an empty bag
    weights, values, offsets, _, _, tables, *_ = _args(gen, False, id_dtype)
    key_lengths = [5, 3]
    return weights, values, offsets, tables, key_lengths


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_opcheck_sequence_ops(id_dtype):
    gen = torch.Generator().manual_seed(3)
    weights, values, offsets, tables, key_lengths = _sequence_args(gen, id_dtype)
    torch.library.opcheck(OPS.sequence_embeddings,
                          (weights, values, offsets, tables, key_lengths, "torch", False, True, 0, []))
    grad_out = torch.randn(5 * 3 + 3 * 5 + 3 * 5, generator=gen)
    torch.library.opcheck(OPS.sequence_embeddings_backward,
                          (grad_out, weights.detach(), values, offsets, tables, key_lengths, "torch", True))
    for optimizer in (1, 2, 3):
        state1 = torch.rand(10 if optimizer == 2 else weights.numel() if optimizer == 3 else 0, generator=gen)
        state2 = torch.rand(weights.numel() if optimizer == 3 else 0, generator=gen)
        torch.library.opcheck(OPS.sequence_embeddings_fused_update,
                              (grad_out, weights.detach(), values, offsets, tables, key_lengths, "torch", optimizer,
                               torch.tensor([0.1, 1e-6, 0.01, 0.9, 0.99]), torch.tensor([3]), state1, state2))
