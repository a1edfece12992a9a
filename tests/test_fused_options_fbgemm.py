"""Fused optimizer options against FBGEMM's CPU TBE, where FBGEMM's CPU build steps them:
row-wise Adagrad's COUNTER and COWCLIP weight-decay modes (FBGEMM's
``CounterBasedRegularizationDefinition`` and ``CowClipDefinition``), through ``fused_params``;
and ``max_norm``, against FBGEMM's CPU step with its GPU step's renormalisation added (below).
100 steps of the batches of ``test_fused_optim_fbgemm.py`` (duplicate ids, a hot row, empty
bags, a table read by two features); every row within 1e-6 of its norm after every step
(the corrections scale hot rows toward zero, where a per-element bound would judge the last
bits of near-zero elements), every state (the sums, ``prev_iter``, ``row_counter``) within
1e-6 relative, untouched rows and their state bit for bit. The hyper-parameters are powers
of two: FBGEMM's CPU step reads them as doubles and jaggedrec's as fp32, and a decay of
``1 - lr * wd`` rounded apart at every step would part the two by an ulp a step. The options FBGEMM's CPU build does not step are checked against float64 references
in ``test_fused_options.py``.
"""

import pytest
import torch

pytest.importorskip("fbgemm_gpu")
from fbgemm_gpu.split_embedding_configs import EmbOptimType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: E402
    ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen, WeightDecayMode)
from fbgemm_gpu.tbe.config.optimizer_config import (  # noqa: E402
    CounterBasedRegularizationDefinition, CounterWeightDecayMode, CowClipDefinition, LearningRateMode)

import jaggedrec as jr  # noqa: E402
from jaggedrec import optim  # noqa: E402
from jaggedrec.distributed.fused_params import fused_optimizer_from_params  # noqa: E402
from test_fused_optim_fbgemm import BATCH, FEATURE_TABLE, TABLES, _assert_close, _batch, _configs, _state  # noqa: E402

_COUNTER, _COWCLIP = CounterBasedRegularizationDefinition, CowClipDefinition
_BASE = dict(optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=2 ** -4, eps=2 ** -16, weight_decay=2 ** -7)
PARAMS = {
    "counter-halflife-decouple": dict(weight_decay_mode=WeightDecayMode.COUNTER, counter_based_regularization=_COUNTER(
        counter_weight_decay_mode=CounterWeightDecayMode.DECOUPLE, counter_halflife=3)),
    "counter-raw-l2": dict(weight_decay_mode=WeightDecayMode.COUNTER, counter_based_regularization=_COUNTER(
        counter_weight_decay_mode=CounterWeightDecayMode.L2, counter_halflife=-1)),
    "counter-sgd-adjusted": dict(weight_decay_mode=WeightDecayMode.COUNTER, counter_based_regularization=_COUNTER(
        counter_weight_decay_mode=CounterWeightDecayMode.DECOUPLE, counter_halflife=0, adjustment_iter=20,
        adjustment_ub=0.5, learning_rate_mode=LearningRateMode.COUNTER_SGD)),
    # (AdagradW's step grows with the root of the row's count: a smaller learning rate keeps the
    # hot rows away from zero, where fp32 rounding of the gradient sums outgrows 1e-6 of the row)
    "counter-adagradw": dict(learning_rate=2 ** -6, weight_decay_mode=WeightDecayMode.COUNTER,
                             counter_based_regularization=_COUNTER(
        counter_weight_decay_mode=CounterWeightDecayMode.ADAGRADW, counter_halflife=-1, adjustment_iter=10)),
    "counter-adagradw-capped": dict(weight_decay_mode=WeightDecayMode.COUNTER, counter_based_regularization=_COUNTER(
        counter_weight_decay_mode=CounterWeightDecayMode.ADAGRADW, counter_halflife=-2, adjustment_ub=0.25)),
    "cowclip-decouple": dict(weight_decay_mode=WeightDecayMode.COWCLIP, cowclip_regularization=_COWCLIP(
        counter_weight_decay_mode=CounterWeightDecayMode.DECOUPLE, counter_halflife=4, weight_norm_coefficient=0.25,
        lower_bound=2 ** -5)),
    "cowclip-l2-clipped": dict(weight_decay_mode=WeightDecayMode.COWCLIP, gradient_clipping=True, max_gradient=0.5,
                               cowclip_regularization=_COWCLIP(counter_weight_decay_mode=CounterWeightDecayMode.L2,
                                                               weight_norm_coefficient=2 ** -4, lower_bound=2 ** -7)),
}


def _tbe(params, tables):
    kwargs = {k: v for k, v in {**_BASE, **params}.items() if k != "optimizer"}
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in TABLES],
        feature_table_map=FEATURE_TABLE, optimizer=_BASE["optimizer"], pooling_mode=PoolingMode.SUM, **kwargs)
    with torch.no_grad():
        for dest, src in zip(tbe.split_embedding_weights(), tables):
            dest.copy_(src)
    return tbe


@pytest.mark.parametrize("backend", ["torch", "torch-static", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("name", list(PARAMS))
def test_counter_modes_match_fbgemm_cpu_tbe(name, backend, monkeypatch):
    if backend == "torch-static":  # the static-shape step that compiled graphs take off CPU
        from jaggedrec.ops import backends
        monkeypatch.setattr(backends, "host_readable", lambda *tensors: False)
    steps = 100 if backend != "triton" else 25  # the interpreter is slow; 25 steps still cover hot rows
    fused = fused_optimizer_from_params({**_BASE, **PARAMS[name]})
    assert isinstance(fused, optim.RowWiseAdagrad) and fused.counter is not None
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(_configs(), fused_optimizer=fused,
                                    backend="triton" if backend == "triton" else "torch")
    tables = [ebc.table_weight(t).detach().clone() for t in range(len(TABLES))]
    tbe = _tbe(PARAMS[name], tables)
    gen = torch.Generator().manual_seed(1)
    touched = [torch.zeros(rows, dtype=torch.bool) for rows, _ in TABLES]
    for step in range(steps):
        for t, now in enumerate(_train_step(ebc, tbe, gen, f"{name} step {step}")):
            touched[t] |= now
            _assert_rows_close(ebc, tbe, t, f"{name} table {t} after step {step}")
    assert all(not bool(m.all()) for m in touched)  # some rows were never touched
    for t, states in enumerate(tbe.split_optimizer_states()):
        got = ebc.table_weight(t).detach()
        assert torch.equal(got[~touched[t]], tables[t][~touched[t]]), f"untouched rows of table {t}"
        assert len(states) == 3  # FBGEMM's sum, prev_iter, row_counter
        for (state_name, per), want in zip(fused.state, states):
            mine = _state(ebc, t, per) if state_name == "sum_sq" else getattr(
                ebc.fused_optimizer_state, f"{ebc.layout.groups[ebc.layout.tables[t].group].name}_{state_name}")
            if state_name != "sum_sq":
                mine = _state_rows(ebc, t, mine)
            _assert_close(mine, want.flatten(), f"{name} {state_name} of table {t}")
            assert not mine[~touched[t]].any(), f"{state_name} of untouched rows"
    names = {k.rsplit(".", 1)[-1] for k in ebc.state_dict() if k.startswith("fused_optimizer_state.")}
    assert {n for n in names if n.endswith("_counter")}, names


def _train_step(ebc, tbe, gen, what):
    """One batch of :func:`_batch` through both modules (forwards compared), both stepped by
    the same upstream gradient. Returns each table's ``[rows]`` bool: the rows it read."""
    values, offsets = _batch(gen)
    keys = [f"f{f}" for f in range(len(FEATURE_TABLE))]
    out = ebc(jr.KeyedJaggedTensor(keys, values, offsets=offsets)).values()
    expected = tbe(values, offsets)
    _assert_close(out, expected.detach(), f"{what}: forward", atol=2e-6)
    upstream = torch.randn(out.shape, generator=gen)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    touched = [torch.zeros(rows, dtype=torch.bool) for rows, _ in TABLES]
    for f, t in enumerate(FEATURE_TABLE):
        touched[t][values[offsets[f * BATCH]:offsets[(f + 1) * BATCH]]] = True
    return touched


def _assert_rows_close(ebc, tbe, table, what):
    """Every row within 1e-6 of its norm (see the module docstring)."""
    want = tbe.split_embedding_weights()[table]
    error = (ebc.table_weight(table).detach() - want).norm(dim=1)
    assert (error <= 1e-6 * want.norm(dim=1) + 1e-7).all(), what


def _state_rows(ebc, table, column):
    """Table ``table``'s rows of a row-wise state column (the group's tables in storage order)."""
    layout = ebc.layout
    slot = layout.tables[table]
    first = sum(t.rows for t in layout.tables if t.group == slot.group and t.offset < slot.offset)
    return column.narrow(0, first, slot.rows)


def test_fused_params_map_fbgemm_definitions():
    fused = fused_optimizer_from_params({**_BASE, **PARAMS["counter-sgd-adjusted"]})
    assert fused.weight_decay_mode == "counter"
    assert fused.counter == optim.fused.CounterRegularization(
        counter_weight_decay_mode="decouple", counter_halflife=0, adjustment_iter=20, adjustment_ub=0.5,
        learning_rate_mode="counter_sgd")
    cow = fused_optimizer_from_params({**_BASE, **PARAMS["cowclip-decouple"]})
    assert cow.weight_decay_mode == "cowclip" and cow.counter.weight_norm_coefficient == 0.25
    with pytest.raises(ValueError, match="tail-id"):
        fused_optimizer_from_params({**_BASE, "weight_decay_mode": WeightDecayMode.COUNTER,
                                     "counter_based_regularization": _COUNTER(
                                         learning_rate_mode=LearningRateMode.TAIL_ID_LR_INCREASE)})
    with pytest.raises(ValueError, match="needs counter_based_regularization"):
        fused_optimizer_from_params({**_BASE, "weight_decay_mode": WeightDecayMode.COUNTER})
    with pytest.raises(ValueError, match="DECOUPLE_GLOBAL.*EXACT_ROWWISE_ADAGRAD"):
        fused_optimizer_from_params({**_BASE, "weight_decay_mode": WeightDecayMode.DECOUPLE_GLOBAL})
    with pytest.raises(ValueError, match="COUNTER is not fused by jaggedrec for ADAM"):
        fused_optimizer_from_params({"optimizer": EmbOptimType.ADAM, "weight_decay_mode": WeightDecayMode.COUNTER})
    assert fused_optimizer_from_params({"optimizer": EmbOptimType.ADAM, "weight_decay": 0.1,
                                        "weight_decay_mode": WeightDecayMode.DECOUPLE}).weight_decay_mode == "decouple"


# max_norm: FBGEMM's GPU row-wise Adagrad scales each updated row whose norm exceeds max_norm
# down to it (its optimizer's post-update); its CPU build takes max_norm and ignores it. The
# reference is FBGEMM's CPU step with each touched row then renormalised as the GPU step does.
# The dims (8, 132, 12) make the Triton step loop over 128-wide column tiles (then it scales the
# stored rows in one more pass); (8, 4, 12) fit one tile.
_MAX_NORM = dict(learning_rate=0.2, eps=1e-5, max_norm=0.3)


@pytest.mark.parametrize("dims", [(8, 4, 12), (8, 132, 12)])
@pytest.mark.parametrize("backend", ["torch", "torch-static", pytest.param("triton", marks=pytest.mark.interpret)])
def test_max_norm_matches_fbgemm_renormalised_rows(backend, dims, monkeypatch):
    if backend == "torch-static":
        from jaggedrec.ops import backends
        monkeypatch.setattr(backends, "host_readable", lambda *tensors: False)
    steps = 100 if backend != "triton" else 20
    fused = fused_optimizer_from_params({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, **_MAX_NORM})
    assert fused == optim.RowWiseAdagrad(0.2, eps=1e-5, max_norm=0.3)
    torch.manual_seed(0)
    features = [[f"f{f}" for f, t in enumerate(FEATURE_TABLE) if t == i] for i in range(len(TABLES))]
    configs = [jr.EmbeddingBagConfig(name=f"t{i}", num_embeddings=rows, embedding_dim=dim, feature_names=features[i])
               for i, ((rows, _), dim) in enumerate(zip(TABLES, dims))]
    ebc = jr.EmbeddingBagCollection(configs, fused_optimizer=fused, backend="triton" if backend == "triton" else "torch")
    tables = [ebc.table_weight(t).detach().clone() for t in range(len(TABLES))]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for (rows, _), dim in zip(TABLES, dims)],
        feature_table_map=FEATURE_TABLE, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, pooling_mode=PoolingMode.SUM,
        **_MAX_NORM)
    with torch.no_grad():
        for dest, src in zip(tbe.split_embedding_weights(), tables):
            dest.copy_(src)
    gen = torch.Generator().manual_seed(2)
    touched = [torch.zeros(rows, dtype=torch.bool) for rows, _ in TABLES]
    left_long = 0  # touched rows FBGEMM's CPU step left past max_norm: it ignores max_norm
    for step in range(steps):
        read = _train_step(ebc, tbe, gen, f"max_norm step {step}")
        for t, (want, now) in enumerate(zip(tbe.split_embedding_weights(), read)):
            touched[t] |= now
            norm = want.double().norm(dim=1, keepdim=True)
            over = now.unsqueeze(1) & (norm > _MAX_NORM["max_norm"])
            left_long += int(over.sum())
            with torch.no_grad():  # FBGEMM's GPU post-update, on the TBE's own rows
                want.copy_(torch.where(over, want.double() * (_MAX_NORM["max_norm"] / norm), want.double()).float())
            _assert_rows_close(ebc, tbe, t, f"max_norm table {t} after step {step}")
    assert left_long > 10
    for t, (states,) in enumerate(tbe.split_optimizer_states()):
        got = ebc.table_weight(t).detach()
        assert torch.equal(got[~touched[t]], tables[t][~touched[t]]), f"untouched rows of table {t}"
        assert (got[touched[t]].norm(dim=1) <= _MAX_NORM["max_norm"] * (1 + 1e-6)).all()
        _assert_close(_state(ebc, t, "row"), states.flatten(), f"sum_sq of table {t}")
    # some untouched rows start longer than max_norm: no step, so no renormalisation
    assert any((tables[t][~touched[t]].norm(dim=1) > _MAX_NORM["max_norm"]).any() for t in range(len(TABLES)))
