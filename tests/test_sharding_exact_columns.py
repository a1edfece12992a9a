"""Column-wise shards of the fused optimizers that step rows by whole-row sums (row-wise
Adagrad, L2 and decoupled; partial row-wise Adam; LARS-SGD; LAMB; partial row-wise LAMB):
each block adds its part of the row sums, one all-to-all a step combines them, and every
block steps as the unsharded module does (bodies in ``exact_columns_cases.py``), in the bag
collection and in the unpooled one alike; under a FeatureProcessedEmbeddingBagCollection the
position weights' gradient comes back too.

Sharded steps are checked against the unsharded module stepped on the global batch: within
fp32 tolerance (the sums are added block by block, in another order than one row's sum), the
blocks' copies of a row-wise state bit for bit equal, and the element-wise moments that only
the summed gradients move bit for bit equal to the unsharded module's. Checkpoints go column-wise on two
ranks -> table-wise on one -> other column-wise blocks on two, bit for bit.

The gloo world costs a spawn and the imports per rank, more than the cases themselves: one
launch of 3 ranks runs every case, the 2-rank ones on a group of ranks 0 and 1 (with a group
of rank 0 alone for the checkpoints' 1-rank stage) after the 3-rank ones."""

import pytest
import torch
import torch.distributed as dist

import exact_columns_cases as cases
import jaggedrec as jr
from distributed_harness import run_ranks
from jaggedrec import optim
from jaggedrec.ops.fused_rules_rowwise import ROW_SUMS, finish_rows, row_partials
from jaggedrec.ops import fused_rules


def _every_case(rank, world, directory):
    pair, alone = dist.new_group([0, 1]), dist.new_group([0])  # made by every rank of the world
    # on 3 ranks (the column-wise plan alone runs on 2), one holding no shard in "idle_rank"
    three = (cases.step_cases(rank, world, ("mixed", "idle_rank"))
             + cases.ec_step_cases(rank, world, ("mixed", "idle_rank")) + [cases.fp_case(rank, world)])
    if rank == 2:
        return three, None, None
    two = (cases.step_cases(rank, 2, group=pair) + cases.ec_step_cases(rank, 2, group=pair)
           + [cases.fp_case(rank, 2, group=pair)])
    return three, two, cases.checkpoint_round_trip(rank, directory, pair, alone)


def test_column_wise_steps_match_the_unsharded_step_and_checkpoints_reshard(tmp_path):
    # a short collective timeout: a rank that skips the step's all-to-all fails within the deadline
    done = run_ranks(_every_case, 3, str(tmp_path), timeout=400, collective_timeout=30)
    three, two, saved = done[0]
    assert done[1][0] == done[2][0] == three and done[1][1] == two, done
    assert "idle_rank/rowwise_adagrad" in three and "ec/idle_rank/rowwise_adagrad" in three, three
    assert "ec/mixed/lamb" in three and three[-1] == "fp/column_wise/rowwise_adagrad", three
    assert len(two) == 20 and "ec/column_wise/rowwise_adagrad" in two and "ec/mixed/partial_rowwise_adam" in two
    # rank 0 also loaded the checkpoints table-wise on a group of its own
    assert len(saved) == 12 and len(done[1][2]) == 8, done


_KINDS = {
    "rowwise_adagrad": optim.RowWiseAdagrad(0.3, eps=1e-3, weight_decay=0.1),
    "rowwise_adagrad_decouple": optim.RowWiseAdagrad(0.3, eps=1e-3, weight_decay=0.1, weight_decay_mode="decouple"),
    "partial_rowwise_adam": optim.PartialRowWiseAdam(0.1, weight_decay=0.05),
    "lars_sgd": optim.LarsSGD(0.2, eta=0.5, weight_decay=0.05),
    "lamb": optim.LAMB(0.1, weight_decay=0.05),
    "partial_rowwise_lamb": optim.PartialRowWiseLAMB(0.1, weight_decay=0.05),
}


@pytest.mark.parametrize("name", list(_KINDS))
def test_column_blocks_step_as_one_row(name):
    """Rows cut into three column blocks, their partial sums added, step as the whole rows
    do under the unsharded rules (``fused_rules.step_in_place``), three steps in a row."""
    fused = _KINDS[name]
    assert set(ROW_SUMS) >= {fused.kind}
    gen = torch.Generator().manual_seed(3)
    n, dim, cuts = 6, 11, (0, 4, 5, 11)
    w = torch.randn(n, dim, generator=gen)
    state = [torch.rand(n, generator=gen) if per == "row" else torch.rand(n, dim, generator=gen)
             for _, per in fused.state]
    whole = [w.clone(), *(s.clone() for s in state)]
    blocks = [[w[:, a:b].clone(), *(s.clone() if s.dim() == 1 else s[:, a:b].clone() for s in state)]
              for a, b in zip(cuts, cuts[1:])]
    hparams = fused.hyperparameters(fused.lr)
    for step in (1, 2, 3):
        g = torch.randn(n, dim, generator=gen)
        s1, s2 = (whole[1:] + [None, None])[:2]
        fused_rules.step_in_place(fused_rules.StepRule(fused.kind, hparams, step), whole[0], g.clone(), s1, s2)
        parts = []
        for (a, b), block in zip(zip(cuts, cuts[1:]), blocks):
            gb = g[:, a:b].clone()
            b1, b2 = (block[1:] + [None, None])[:2]
            parts.append((gb, b1, b2, *row_partials(fused.kind, hparams, step, block[0], gb, b1, b2)))
        sums = parts[0][3].clone()
        for p in parts[1:]:
            sums += p[3]
        for block, (gb, b1, b2, _, carried) in zip(blocks, parts):
            finish_rows(fused.kind, hparams, step, dim, block[0], gb, b1, b2, sums, carried)
    torch.testing.assert_close(torch.cat([b[0] for b in blocks], 1), whole[0], rtol=2e-6, atol=2e-6)
    for k, (_, per) in enumerate(fused.state):
        got = blocks[0][k + 1] if per == "row" else torch.cat([b[k + 1] for b in blocks], 1)
        torch.testing.assert_close(got, whole[k + 1], rtol=2e-6, atol=2e-6)
        if per == "row":  # every block keeps the same row-wise state
            assert all(torch.equal(b[k + 1], blocks[0][k + 1]) for b in blocks)


def test_both_collections_take_column_blocks_of_whole_row_optimizers():
    """The unpooled collection's layout has exact tables and its sharder says it combines them
    (the planner reads that), as the bag collection's; a collection that does not combine them
    refuses such blocks."""
    from jaggedrec.distributed.embedding import EmbeddingCollectionSharder
    from jaggedrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from jaggedrec.distributed.shard_layout import ShardLayout
    from jaggedrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan
    from jaggedrec.distributed.shards import check_fused
    tables = [jr.EmbeddingConfig(name="wide", embedding_dim=8, num_embeddings=4, feature_names=["f"])]
    ec = jr.EmbeddingCollection(tables)
    plan = construct_module_sharding_plan(ec, {"wide": column_wise(ranks=[0, 1])}, world_size=2)
    layout = ShardLayout(tables, plan, 2, whole_rows=True)
    assert layout.exact_tables == {0}
    assert EmbeddingCollectionSharder.exact_columns and EmbeddingBagCollectionSharder.exact_columns
    with pytest.raises(NotImplementedError, match=r"\['wide'\].*row-wise Adagrad"):
        check_fused(layout, optim.RowWiseAdagrad(0.1))
    check_fused(layout, optim.RowWiseAdagrad(0.1), exact_columns=True)
    check_fused(layout, optim.Adagrad(0.1))  # element-wise: column blocks step exactly


def test_options_the_exact_step_does_not_implement_are_refused():
    import dataclasses

    from jaggedrec.distributed.exact_columns import check_exact
    from jaggedrec.distributed.shard_layout import ShardLayout
    from jaggedrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan

    @dataclasses.dataclass(frozen=True, repr=False)
    class Rounded(optim.RowWiseAdagrad):  # an option added to the config, unknown to the exact step
        stochastic_rounding: bool = False

    tables = [jr.EmbeddingBagConfig(name="wide", embedding_dim=8, num_embeddings=4, feature_names=["f"])]
    plan = construct_module_sharding_plan(jr.EmbeddingBagCollection(tables), {"wide": column_wise(ranks=[0, 1])},
                                          world_size=2)
    layout = ShardLayout(tables, plan, 2, whole_rows=True)
    assert layout.exact_tables == {0}
    check_exact(Rounded(0.1), layout)  # at its default: the step is the plain one
    with pytest.raises(NotImplementedError, match=r"\['wide'\].*stochastic_rounding=True"):
        check_exact(Rounded(0.1, stochastic_rounding=True), layout)
    with pytest.raises(NotImplementedError, match=r"\['wide'\]: Adagrad is not stepped"):
        check_exact(optim.Adagrad(0.1), layout)
