"""Sharded checkpoints through torch.distributed.checkpoint: saved under one plan on 2 ranks,
loaded under others on 1, 2 and 3 ranks, into an unsharded module, and through it into
TorchRec (bodies in ``checkpoint_cases.py``)."""

import pytest
import torch

import checkpoint_cases as cases
from distributed_harness import run_ranks
from jr_testing import Batch, assert_close, reference_pooled

# saved case -> the plan it is loaded into, per world size; every saved plan goes into another
# plan on 2 ranks (row-wise Adagrad refuses column blocks, so its cases avoid them)
TARGETS = {
    1: {"adam-table_wise": "mixed", "adam-column_wise": "table_wise", "adam-row_wise": "mixed",
        "adam-mixed": "table_wise", "rowwise_adagrad-table_wise": "mixed", "rowwise_adagrad-row_wise": "table_wise",
        "rowwise_adagrad-mixed": "mixed", "adagrad-column_wise": "mixed", "partial_rowwise_adam-mixed": "table_wise"},
    2: {"adam-table_wise": "row_wise", "adam-column_wise": "mixed", "adam-row_wise": "column_wise",
        "adam-mixed": "table_wise", "rowwise_adagrad-table_wise": "row_wise", "rowwise_adagrad-row_wise": "mixed",
        "rowwise_adagrad-mixed": "table_wise", "adagrad-column_wise": "row_wise",
        "partial_rowwise_adam-mixed": "row_wise"},
    3: {"adam-table_wise": "column_wise", "adam-column_wise": "row_wise", "adam-row_wise": "mixed",
        "adam-mixed": "row_wise", "rowwise_adagrad-table_wise": "mixed", "rowwise_adagrad-row_wise": "table_wise",
        "rowwise_adagrad-mixed": "row_wise", "adagrad-column_wise": "table_wise",
        "partial_rowwise_adam-mixed": "mixed"},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved on 2 ranks, and in the same launch loaded into other plans there."""
    directory = tmp_path_factory.mktemp("dcp")
    results = run_ranks(cases.save_and_load_cases, cases.SAVE_WORLD, str(directory), TARGETS[2], timeout=300)
    saved, loaded = zip(*results)
    assert saved[0] == saved[1] == [f"{m}-{p}" for m, p in cases._saved()]
    return str(directory), saved[0], list(loaded)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_checkpoints_reshard_across_plans_and_world_sizes(checkpoints, world):
    directory, saved, loaded_on_two = checkpoints
    targets = TARGETS[world]
    assert sorted(targets) == sorted(saved)
    if world == 2:
        assert all(plan != case.split("-")[1] for case, plan in targets.items())
        checked = loaded_on_two
    else:
        checked = run_ranks(cases.load_cases, world, directory, targets, timeout=300)
    assert checked[0] == [f"{c} -> {p} on {world}" for c, p in targets.items()]


@pytest.mark.parametrize("case", ["adam-column_wise", "rowwise_adagrad-mixed"])
def test_checkpoint_loads_into_an_unsharded_module_and_into_torchrec(checkpoints, case):
    directory = checkpoints[0]
    module, reference = cases.unsharded_weights(directory, case)
    for t in range(len(cases._configs())):
        assert_close(module.table_weight(t).float(), reference.table_weight(t).detach().float(),
                     module.table_weight(t).dtype, f"{case}: table {t}")
    gb, kjt = cases.probe_batch()
    expected = reference_pooled(reference, gb)
    assert_close(module(kjt).values(), expected, torch.float16, case)
    # TorchRec's module (a loop of nn.EmbeddingBag) cannot weight a MEAN bag: unweighted there
    torchrec = pytest.importorskip("torchrec")
    tables = [torchrec.EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=c.num_embeddings,
                                          feature_names=list(c.feature_names),
                                          pooling=torchrec.PoolingType[c.pooling.name],
                                          data_type=torchrec.DataType[c.data_type.name])
              for c in cases._configs()]
    theirs = torchrec.EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    theirs.load_state_dict(module.state_dict())
    out = theirs(torchrec.KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths()))
    assert out.keys() == module(kjt).keys()
    unweighted = Batch(None, {k: (v, n, None) for k, (v, n, _) in gb.per_key.items()})
    assert_close(out.values().float(), reference_pooled(reference, unweighted), torch.float16, f"{case} in TorchRec")
