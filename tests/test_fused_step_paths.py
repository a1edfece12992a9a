"""The eager CPU fused step's fast paths against a float64 reference: touched rows stepped by
one sparse add (``fused_rules.scaled_gradient``: SGD, row-wise and exact Adagrad), and bag
gradients read where they lie in the output gradient when bags hold few ids."""

import pytest
import torch

import jaggedrec as jr
from jaggedrec import optim
from jaggedrec.ops import fused_groups, fused_rows, fused_rules
from jr_testing import assert_close, random_kjt, reference_pooled

OPTIMIZERS = {
    "sgd": optim.SGD(lr=0.3),
    "rowwise_adagrad": optim.RowWiseAdagrad(lr=0.2, eps=1e-6),
    "adagrad": optim.Adagrad(lr=0.2, eps=1e-6),
    "sgd_clipped": optim.SGD(lr=0.3, max_gradient=0.4),
}


def _configs(dims=(8, 16)):
    # dims d, d, 2d in that order: every feature's columns fall into whole rows of its dim,
    # so the bag gradients can be read in place from grad_out viewed [B * 4, d] or [B * 2, 2d]
    return [jr.EmbeddingBagConfig(name="a", embedding_dim=dims[0], num_embeddings=40, feature_names=["x"]),
            jr.EmbeddingBagConfig(name="b", embedding_dim=dims[0], num_embeddings=30, feature_names=["y"]),
            jr.EmbeddingBagConfig(name="c", embedding_dim=dims[1], num_embeddings=25, feature_names=["z"])]


def _reference_step(opt, tables, sum_sq, batch, ebc, upstream):
    """One step of ``opt`` on float64 ``tables`` (and row or element state ``sum_sq``)."""
    leaves = [t.clone().requires_grad_() for t in tables]
    weights = {k: v[2].double() for k, v in batch.per_key.items()} if batch.per_key["x"][2] is not None else None
    out = reference_pooled(ebc, batch, leaves, weights)
    bound = opt.max_gradient
    (out * (upstream if bound is None else upstream.clamp(-bound, bound))).sum().backward()
    for t, (table, leaf, feature) in enumerate(zip(tables, leaves, "xyz")):
        touched = torch.unique(batch.per_key[feature][0])
        g = leaf.grad[touched]
        if isinstance(opt, optim.SGD):
            table[touched] -= opt.lr * g
        elif isinstance(opt, optim.RowWiseAdagrad):
            sum_sq[t][touched] += g.square().mean(1)
            table[touched] -= opt.lr * g / (sum_sq[t][touched].sqrt() + opt.eps).unsqueeze(1)
        else:
            sum_sq[t][touched] += g.square()
            table[touched] -= opt.lr * g / (sum_sq[t][touched].sqrt() + opt.eps)


def _train(opt_name, weighted, one_hot, id_dtype=torch.int64, steps=4, dims=(8, 16)):
    opt = OPTIMIZERS[opt_name]
    torch.manual_seed(5)
    ebc = jr.EmbeddingBagCollection(_configs(dims), is_weighted=weighted, fused_optimizer=opt)
    tables = [ebc.embedding_bags[c].weight.detach().double().clone() for c in "abc"]
    sum_sq = [torch.zeros(t.shape[0] if isinstance(opt, optim.RowWiseAdagrad) else t.shape, dtype=torch.float64)
              for t in tables]
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        # at most 2 ids a bag (or exactly 1), duplicates, empty bags
        batch = random_kjt(gen, ["z", "x", "y"], {"x": 40, "y": 30, "z": 25}, 6, max_len=2, weighted=weighted,
                           one_hot=one_hot, id_dtype=id_dtype)
        out = ebc(batch.kjt).values()
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        _reference_step(opt, tables, sum_sq, batch, ebc, upstream)
        out.backward(upstream.float())
    return ebc, tables


def _counting(monkeypatch, module, name, calls, is_taken):
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        result = fn(*args, **kwargs)
        calls[name] = calls.get(name, 0) + bool(is_taken(result))
        return result
    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("one_hot", [False, True])
def test_sparse_add_and_in_place_bag_gradients_match_float64_reference(opt_name, weighted, one_hot, monkeypatch):
    calls = {}
    _counting(monkeypatch, fused_groups, "_bag_rows_in_place", calls, lambda r: r is not None)
    _counting(monkeypatch, fused_rows, "scaled_gradient", calls, lambda r: r is not None)
    monkeypatch.setattr(fused_rows, "_STREAM_MIN_TOUCHED", dict.fromkeys(fused_rules.STATE_LAYOUT, 2.0))
    ebc, tables = _train(opt_name, weighted, one_hot, id_dtype=torch.int32 if one_hot else torch.int64)
    assert calls["_bag_rows_in_place"] > 0 and calls["scaled_gradient"] > 0, calls  # both fast paths ran
    for name, table in zip("abc", tables):
        assert_close(ebc.embedding_bags[name].weight.detach(), table, what=f"{opt_name} table {name}")


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("stream", [False, True])
def test_bag_gradients_in_place_give_the_copys_bits(opt_name, stream, monkeypatch):
    """Read in place or from the group's copy of its columns, the same sums in the same order."""
    monkeypatch.setattr(fused_rows, "_STREAM_MIN_TOUCHED",
                        dict.fromkeys(fused_rules.STATE_LAYOUT, 0.0 if stream else 2.0))
    states = []
    for most in (0, 2):  # 0: every group copies its columns
        monkeypatch.setattr(fused_groups, "_IN_PLACE_MAX_IDS_PER_BAG", most)
        states.append(_train(opt_name, True, False)[0].state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.skipif(not fused_rows._CSR_ADD, reason="the one-pass SGD update needs torch's MKL sparse product")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("copied", [False, True])
def test_streamed_sgd_in_one_pass_matches_float64_reference_and_the_chunked_bits(weighted, one_hot, copied,
                                                                                 monkeypatch):
    """Streamed plain SGD sums each row's run and adds it in one sparse product
    (``_add_run_sums``): against float64, and bit for bit the chunked sums and add it replaces
    (chunks of one to four rows); bag gradients read in place or from the group's copy."""
    monkeypatch.setattr(fused_rows, "_STREAM_MIN_TOUCHED", dict.fromkeys(fused_rules.STATE_LAYOUT, 0.0))
    if copied:
        monkeypatch.setattr(fused_groups, "_IN_PLACE_MAX_IDS_PER_BAG", 0)
    calls = {}
    _counting(monkeypatch, fused_rows, "_add_run_sums", calls, lambda r: True)
    ids = torch.int32 if one_hot else torch.int64
    ebc, tables = _train("sgd", weighted, one_hot, id_dtype=ids, dims=(32, 64))
    ran = calls.get("_add_run_sums", 0)
    assert ran > 0, calls
    for name, table in zip("abc", tables):
        assert_close(ebc.embedding_bags[name].weight.detach(), table, what=f"sgd table {name}")
    monkeypatch.setattr(fused_rows, "_CSR_ADD", False)
    monkeypatch.setattr(fused_rows, "_CHUNK_BYTES", 48)
    chunked = _train("sgd", weighted, one_hot, id_dtype=ids, dims=(32, 64))[0].state_dict()
    assert calls["_add_run_sums"] == ran  # the second run took the chunked update
    for key, value in ebc.state_dict().items():
        assert torch.equal(value, chunked[key]), key


@pytest.mark.skipif(not fused_rows._CSR_ADD, reason="the one-pass SGD update needs torch's MKL sparse product")
def test_streamed_sgd_in_one_pass_gives_the_same_bits_on_two_threads(monkeypatch):
    """Each table a piece of work (host_tasks), stepped by the sparse product on one worker or
    the caller: the same bits with one thread as with two."""
    monkeypatch.setattr(fused_rows, "_STREAM_MIN_TOUCHED", dict.fromkeys(fused_rules.STATE_LAYOUT, 0.0))
    monkeypatch.setattr(fused_groups, "_GROUP_MIN_IDS", 1)
    calls = {}
    _counting(monkeypatch, fused_rows, "_add_run_sums", calls, lambda r: True)
    before = torch.get_num_threads()
    states = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            states.append(_train("sgd", True, False, dims=(32, 64))[0].state_dict())
        finally:
            torch.set_num_threads(before)
    assert calls.get("_add_run_sums", 0) > 0, calls
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 3, 4, 8, 64])
@pytest.mark.parametrize("layout", ["whole", "rows_from_1", "columns", "row_wise"])
def test_copy_rows_writes_what_a_row_loop_writes(dtype, dim, layout):
    """The scattered write-back (``fused_rows.copy_rows``, 16-byte elements where the rows
    allow): the bytes a loop of row assignments writes, on views at odd offsets and strides."""
    gen = torch.Generator().manual_seed(dim)
    base = torch.randn(50, dim + 4, generator=gen).to(dtype)
    dest = {"whole": base.view(-1)[:40 * dim].view(40, dim),
            "rows_from_1": base.view(-1)[dim:41 * dim].view(40, dim),  # storage offset of one row
            "columns": base[:40, 2:2 + dim],  # row stride past the row
            "row_wise": base[:40, 0]}[layout]
    rows = torch.randperm(dest.shape[0], generator=gen)[:17]
    values = torch.randn((17,) + tuple(dest.shape[1:]), generator=gen).to(dtype)
    expected = base.clone()
    expected_dest = {"whole": expected.view(-1)[:40 * dim].view(40, dim),
                     "rows_from_1": expected.view(-1)[dim:41 * dim].view(40, dim),
                     "columns": expected[:40, 2:2 + dim], "row_wise": expected[:40, 0]}[layout]
    for r, v in zip(rows.tolist(), values):
        expected_dest[r] = v
    fused_rows.copy_rows(dest, rows, values)
    assert torch.equal(base.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))



@pytest.mark.parametrize("opt_name", ["sgd", "rowwise_adagrad", "adagrad"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_scattered_rows_give_the_streamed_bits(opt_name, id_dtype, monkeypatch):
    """Scattered rows (state gathered, written back through ``scaled_gradient``'s ``store``
    before exact Adagrad's copy becomes its denominator in place; chunks of a few rows) and
    streamed rows (state stepped where it lies) end with the same weights and state, bit for
    bit: duplicate ids, empty bags, several steps."""
    calls = {}
    _counting(monkeypatch, fused_rows, "scaled_gradient", calls, lambda r: r is not None)
    monkeypatch.setattr(fused_rows, "_SCATTERED_CHUNK_BYTES", dict.fromkeys(fused_rules.STATE_LAYOUT, 64))  # 1-8 rows
    states = []
    for stream in (True, False):
        monkeypatch.setattr(fused_rows, "_STREAM_MIN_TOUCHED",
                            dict.fromkeys(fused_rules.STATE_LAYOUT, 0.0 if stream else 2.0))
        monkeypatch.setattr(fused_rows, "_CSR_ADD", False)  # SGD streamed: the chunked sums and add
        states.append(_train(opt_name, False, False, id_dtype=id_dtype, steps=3)[0].state_dict())
    assert calls.get("scaled_gradient", 0) > 0, calls
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
