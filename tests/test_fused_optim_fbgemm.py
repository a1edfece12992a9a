"""Fused optimizers against FBGEMM's CPU TBE, where FBGEMM steps them on CPU (EXACT_SGD,
EXACT_ROWWISE_ADAGRAD, EXACT_ADAGRAD): 100 steps of the same batches (duplicate ids, a hot
row, empty bags, a table read by two features) and upstream gradients; weights and optimizer
state agree to 1e-6 relative after every step, and the rows no step touched are bit for
bit as they were. The optimizers FBGEMM steps only on GPU are checked against float64
references in ``test_fused_optim.py``.
"""

import pytest
import torch

pytest.importorskip("fbgemm_gpu")
from fbgemm_gpu.split_embedding_configs import EmbOptimType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: E402
    ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen, WeightDecayMode)

import jaggedrec as jr  # noqa: E402
from jaggedrec import optim  # noqa: E402
from jaggedrec.distributed.fused_params import fused_optimizer_from_params  # noqa: E402

# (rows, dim) per table; features f0 -> t0, f1 and f2 -> t1, f3 -> t2
TABLES = [(23, 8), (11, 4), (7, 12)]
FEATURE_TABLE = [0, 1, 1, 2]
BATCH = 6
PARAMS = {
    "EXACT_SGD": dict(learning_rate=0.05),
    "EXACT_ROWWISE_ADAGRAD": dict(learning_rate=0.1, eps=1e-5),
    "EXACT_ADAGRAD": dict(learning_rate=0.1, eps=1e-5),
    # gradient clipping: FBGEMM clamps each output-gradient element before the sums
    "EXACT_ROWWISE_ADAGRAD+clip": dict(learning_rate=0.1, eps=1e-5, gradient_clipping=True, max_gradient=0.4),
    "EXACT_SGD+clip": dict(learning_rate=0.05, gradient_clipping=True, max_gradient=0.3),
    # WeightDecayMode.NONE: the weight_decay is not applied. (fbgemm-gpu-cpu 1.8.0's CPU step
    # applies no weight decay in the L2 and DECOUPLE modes either, so those are checked against
    # the float64 references of test_fused_optim.py only)
    "EXACT_ROWWISE_ADAGRAD+none": dict(learning_rate=0.1, eps=1e-5, weight_decay=0.05,
                                       weight_decay_mode=WeightDecayMode.NONE),
}


def _configs():
    features = [[f"f{f}" for f, t in enumerate(FEATURE_TABLE) if t == i] for i in range(len(TABLES))]
    return [jr.EmbeddingBagConfig(name=f"t{i}", num_embeddings=rows, embedding_dim=dim, feature_names=features[i])
            for i, (rows, dim) in enumerate(TABLES)]


def _batch(gen):
    """``(values, offsets)`` key-major over the four features: a hot row (id 0 of each
    table) takes about a third of the ids, the rest are uniform; some bags are empty."""
    values, lengths = [], []
    for table in FEATURE_TABLE:
        rows = TABLES[table][0]
        n = torch.randint(0, 5, (BATCH,), generator=gen)
        n[int(torch.randint(0, BATCH, (1,), generator=gen))] = 0
        ids = torch.randint(0, rows - 2, (int(n.sum()),), generator=gen)  # the last two: never read
        ids[torch.rand(ids.shape, generator=gen) < 0.35] = 0
        values.append(ids)
        lengths.append(n)
    lengths = torch.cat(lengths)
    return torch.cat(values), torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def _tbe(name, tables):
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in TABLES],
        feature_table_map=FEATURE_TABLE, optimizer=EmbOptimType[name.split("+")[0]], pooling_mode=PoolingMode.SUM,
        **PARAMS[name])
    with torch.no_grad():
        for dest, src in zip(tbe.split_embedding_weights(), tables):
            dest.copy_(src)
    return tbe


def _state(ebc, table, per):
    """Table ``table``'s optimizer state: ``[rows, dim]`` element-wise, ``[rows]`` row-wise."""
    layout = ebc.layout
    slot = layout.tables[table]
    group = layout.groups[slot.group].name
    name = dict(ebc.fused_optimizer.state)
    state = getattr(ebc.fused_optimizer_state, f"{group}_{next(n for n, p in name.items() if p == per)}")
    if per == "row":
        # the group's tables row after row in storage order
        first = sum(t.rows for t in layout.tables if t.group == slot.group and t.offset < slot.offset)
        return state.narrow(0, first, slot.rows)
    return state.narrow(0, slot.offset, slot.rows * slot.stride).view(slot.rows, slot.stride)


def _assert_close(actual, expected, what, atol=1e-7):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, msg=what)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("name", list(PARAMS))
def test_fused_step_matches_fbgemm_cpu_tbe(name, backend):
    steps = 100 if backend == "torch" else 25  # the interpreter is slow; 25 steps still cover hot rows
    fused = fused_optimizer_from_params(dict(PARAMS[name], optimizer=name.split("+")[0]))
    torch.manual_seed(0)
    ebc = jr.EmbeddingBagCollection(_configs(), fused_optimizer=fused, backend=backend)
    tables = [ebc.table_weight(t).detach().clone() for t in range(len(TABLES))]
    tbe = _tbe(name, tables)
    gen = torch.Generator().manual_seed(1)
    keys = [f"f{f}" for f in range(len(FEATURE_TABLE))]
    touched = [torch.zeros(rows, dtype=torch.bool) for rows, _ in TABLES]
    for step in range(steps):
        values, offsets = _batch(gen)
        kjt = jr.KeyedJaggedTensor(keys, values, offsets=offsets)
        out = ebc(kjt).values()
        expected = tbe(values, offsets)
        # sums of a few rows of ~1 in another order: their last bits differ where they cancel
        _assert_close(out, expected.detach(), f"{name} forward at step {step}", atol=2e-6)
        upstream = torch.randn(out.shape, generator=gen)
        (out * upstream).sum().backward()
        (expected * upstream).sum().backward()
        for f, t in enumerate(FEATURE_TABLE):
            touched[t][values[offsets[f * BATCH]:offsets[(f + 1) * BATCH]]] = True
        for t, want in enumerate(tbe.split_embedding_weights()):
            _assert_close(ebc.table_weight(t).detach(), want, f"{name} table {t} after step {step}")
    assert all(not bool(m.all()) for m in touched)  # some rows were never touched
    states = tbe.split_optimizer_states() if fused.state else [()] * len(TABLES)
    for t in range(len(TABLES)):
        got = ebc.table_weight(t).detach()
        assert torch.equal(got[~touched[t]], tables[t][~touched[t]]), f"untouched rows of table {t}"
        for (state_name, per), want in zip(fused.state, states[t]):
            _assert_close(_state(ebc, t, per), want, f"{name} {state_name} of table {t}")
            if per == "element":
                assert not _state(ebc, t, per)[~touched[t]].any()


def test_fbgemm_enum_maps_onto_the_fused_configs():
    for name, params in PARAMS.items():
        name = name.split("+")[0]
        fused = fused_optimizer_from_params(dict(params, optimizer=EmbOptimType[name]))
        assert fused == fused_optimizer_from_params(dict(params, optimizer=name))
    assert fused_optimizer_from_params(dict(PARAMS["EXACT_SGD+clip"], optimizer="EXACT_SGD")).max_gradient == 0.3
    assert fused_optimizer_from_params({"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.3}) == \
        optim.Adagrad(0.3, eps=1e-8)
    assert isinstance(fused_optimizer_from_params({"optimizer": EmbOptimType.LARS_SGD}), optim.LarsSGD)
    for name, cls in (("PARTIAL_ROWWISE_ADAM", optim.PartialRowWiseAdam), ("LAMB", optim.LAMB),
                      ("PARTIAL_ROWWISE_LAMB", optim.PartialRowWiseLAMB)):
        assert type(fused_optimizer_from_params({"optimizer": EmbOptimType[name]})) is cls
