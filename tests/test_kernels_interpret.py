"""The Triton kernels, run on the CPU by Triton's interpreter, against the float64 reference.

The interpreter costs about a millisecond per program instance, so batches are tiny.
On a CUDA machine these run compiled on the GPU instead.
"""

import warnings

import pytest
import torch

import jaggedrec as jr
from jr_testing import check_module, table_grad

pytestmark = pytest.mark.interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dims", [[4], [1, 3, 7], [130, 5, 2]])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_kernels_match_reference(dims, weighted, deterministic):
    check_module(0, dims, weighted, backend="triton", deterministic=deterministic, device=DEVICE)


@pytest.mark.parametrize("data_type", [jr.DataType.FP16, jr.DataType.BF16])
def test_half_tables_accumulate_in_fp32(data_type):
    check_module(1, [3, 8], True, data_type=data_type, backend="triton", device=DEVICE)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_int32_and_int64_ids_and_offsets(id_dtype):
    check_module(2, [5, 6], False, id_dtype=id_dtype, use_offsets=True, backend="triton", device=DEVICE)


@pytest.mark.parametrize("long_run", [0, 2])
def test_hot_rows_take_the_long_run_path(long_run, monkeypatch):
    """Runs of more than LONG_RUN contributions (hot rows) are summed by their own kernel.
    Lower the bar so that tiny batches have such runs beside short ones (0: every run)."""
    from jaggedrec.kernels import row_runs
    monkeypatch.setattr(row_runs, "LONG_RUN", long_run)
    check_module(6, [4, 130, 3], True, backend="triton", deterministic=True, device=DEVICE)
    check_module(7, [8, 8], True, backend="triton", sparse=True, device=DEVICE)


def test_wide_dim_loops_over_column_blocks():
    check_module(3, [1024, 3], True, batch=3, max_len=3, backend="triton", device=DEVICE)


def test_one_id_per_bag():
    check_module(4, [8, 8], True, one_hot=True, backend="triton", device=DEVICE)


def test_sparse_gradients():
    ebc, _ = check_module(5, [4, 7, 4], True, backend="triton", sparse=True, device=DEVICE)
    flat = next(ebc.parameters())
    assert flat.grad.is_sparse and flat.grad._nnz() == flat.grad.coalesce()._nnz()  # one entry per element


def test_deterministic_gradients_are_bit_identical():
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        ebc, out = check_module(6, [8, 8], True, batch=6, max_len=8, backend="triton", deterministic=True, device=DEVICE)
        grads.append(next(ebc.parameters()).grad.clone())
    assert torch.equal(grads[0], grads[1])


def _bad_batch():
    configs = [jr.EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10, feature_names=["user"]),
               jr.EmbeddingBagConfig(name="t_item", embedding_dim=3, num_embeddings=7, feature_names=["item"])]
    kjt = jr.KeyedJaggedTensor(["user", "item"], torch.tensor([1, 2, 3, 9]), lengths=torch.tensor([1, 1, 1, 1]))
    return configs, kjt.to(torch.device(DEVICE))


def test_bounds_check_raise_names_feature_without_validation():
    configs, kjt = _bad_batch()
    ebc = jr.EmbeddingBagCollection(configs, backend="triton", validate=False, bounds_check="raise", device=DEVICE)
    with pytest.raises(ValueError, match=r"feature 'item'.*id 9 in sample 1 is out of range \[0, 7\)"):
        ebc(kjt)


def test_bounds_check_clamp_skips_and_warns():
    configs, kjt = _bad_batch()
    ebc = jr.EmbeddingBagCollection(configs, backend="triton", validate=False, bounds_check="clamp", device=DEVICE)
    with pytest.warns(RuntimeWarning, match="'item': 1"):
        out = ebc(kjt)
    item = ebc.embedding_bags["t_item"].weight.detach().cpu()
    assert torch.allclose(out["item"][0].cpu(), item[3])
    assert torch.equal(out["item"][1].cpu(), torch.zeros(3))  # the bad id was skipped, not read
    out.values().sum().backward()  # and gets no gradient: no write outside the table
    grad = table_grad(ebc, "t_item").cpu()
    assert grad[3].eq(1).all() and grad.sum() == 3


def test_bounds_check_off_trusts_ids():
    configs, kjt = _bad_batch()
    kjt = jr.KeyedJaggedTensor(["user", "item"], torch.tensor([1, 2, 3, 6]), lengths=torch.tensor([1, 1, 1, 1]))
    kjt = kjt.to(torch.device(DEVICE))
    ebc = jr.EmbeddingBagCollection(configs, backend="triton", validate=False, bounds_check="off", device=DEVICE)
    with warnings.catch_warnings():
        # ours only: triton 3.6's interpreter raises numpy deprecation warnings of its own
        warnings.filterwarnings("error", message="EmbeddingBagCollection")
        out = ebc(kjt)
    assert torch.allclose(out["item"][1], ebc.embedding_bags["t_item"].weight[6])
    assert out["item"].device.type == DEVICE


def test_forward_writes_every_output_element():
    """Launch the forward into a NaN-poisoned output: every element must be overwritten,
    including empty bags and the columns past a narrow feature's dim."""
    from jaggedrec.kernels.pooled_fwd import pooled_fwd
    from jaggedrec.ops.op_args import OpBatch
    gen = torch.Generator().manual_seed(7)
    batch = 6  # feature 0: 9 rows of dim 3; feature 1: 5 rows of dim 17
    weights = torch.randn(9 * 3 + 5 * 17, generator=gen).to(DEVICE)
    lengths = torch.tensor([2, 0, 1, 3, 0, 1, 0, 0, 4, 1, 2, 0])
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    values = torch.cat([torch.randint(0, 9, (7,), generator=gen), torch.randint(0, 5, (7,), generator=gen)])
    meta = torch.tensor([[0, 3, 9, 0, 0, 0, 0], [27, 17, 5, 3, 1, 1, 9]])  # feature 1 pools by MEAN
    out = torch.full((batch, 20), float("nan"), device=DEVICE)
    errors = torch.full((2,), 0, dtype=torch.int64, device=DEVICE)
    pooled_fwd(weights, OpBatch(values.to(DEVICE), offsets.to(DEVICE)), meta.to(DEVICE), out, errors, 17, 1, batch)
    out = out.cpu()
    assert torch.isfinite(out).all() and errors.eq(0).all()
    w = weights.cpu()
    t0, t1 = w[:27].view(9, 3), w[27:].view(5, 17)
    for b in range(batch):
        ids0 = values[offsets[b]:offsets[b + 1]]
        ids1 = values[offsets[batch + b]:offsets[batch + b + 1]]
        torch.testing.assert_close(out[b, :3], t0[ids0].sum(0))
        expected1 = t1[ids1].mean(0) if ids1.numel() else torch.zeros(17)
        torch.testing.assert_close(out[b, 3:], expected1)


@pytest.mark.parametrize("fused,unroll", [(None, 2), ("sgd", 2), ("adagrad", 2), (None, 1), ("adagrad", 1)])
def test_pipelined_loops_give_the_legacy_loops_bits(fused, unroll, monkeypatch):
    """The two-stage gather and run loops add the same rows in the same order as the loops
    they replaced (JAGGEDREC_LEGACY_LOOPS=1): the same forward bits (fp32 SUM and MEAN, with
    per-id weights, uneven and empty bags, duplicate ids), the same deterministic weight
    gradient, the same fused update. ``unroll``: the run loop's UNROLL (the interpreter's config
    has 2; at 1 a run's rows are masked by their positions, see row_runs._run_rows)."""
    import triton
    from jaggedrec import optim
    from jaggedrec.kernels import pooled_fused, row_runs
    from jr_testing import key_rows, random_configs, random_kjt, shuffled_keys
    if unroll != 2:
        for kernel in (row_runs._rows_grad_kernel, pooled_fused._fused_update_kernel):
            monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_U": 4, "UNROLL": unroll}, num_warps=1)])
    results = []
    for legacy in ("1", "0"):
        monkeypatch.setenv("JAGGEDREC_LEGACY_LOOPS", legacy)
        gen = torch.Generator().manual_seed(12)
        configs = random_configs(gen, [8, 3, 130], jr.DataType.FP32)
        optimizer = {None: None, "sgd": optim.SGD(lr=0.1), "adagrad": optim.RowWiseAdagrad(lr=0.1)}[fused]
        torch.manual_seed(12)  # the same initial tables in both runs
        ebc = jr.EmbeddingBagCollection(configs, is_weighted=True, device=DEVICE, backend="triton",
                                        deterministic=True, fused_optimizer=optimizer)
        rows = key_rows(configs)
        keys = shuffled_keys(gen, list(rows))
        kjt = random_kjt(gen, keys, rows, 7, max_len=6, weighted=True, empty_keys=keys[:1]).kjt.to(DEVICE)
        before = next(ebc.parameters()).detach().clone()
        out = ebc(kjt)
        (out.values() * torch.randn(out.values().shape, generator=gen).to(DEVICE)).sum().backward()
        tables = [t.detach().clone() for t in ebc.parameters()] if fused else [next(ebc.parameters()).grad.clone()]
        if fused:  # the step happened
            assert not torch.equal(tables[0], before)
        results.append((before, out.values().detach().clone(), tables))
    (before_old, out_old, tables_old), (before_new, out_new, tables_new) = results
    assert torch.equal(before_old, before_new)
    assert torch.equal(out_old, out_new)
    assert len(tables_old) == len(tables_new) and all(torch.equal(a, b) for a, b in zip(tables_old, tables_new))


@pytest.mark.parametrize("sparse", [False, True])
def test_one_tile_run_sums_give_the_column_loop_bits(sparse, monkeypatch):
    """The deterministic backward sums a tile of runs without a loop over column tiles when
    every dim fits one tile (ONE_TILE): the same gradient bits as that loop (the kernel before,
    forced here), both checked against the float64 reference by check_module (per-id weights,
    so scaled runs; dims 8, 3, 7; duplicate ids and an empty feature)."""
    from jaggedrec.kernels import row_runs
    launched, original = [], row_runs.wrap_triton

    def spy(force):
        def wrap(kernel):
            launch = original(kernel)
            if kernel is not row_runs._rows_grad_kernel:
                return launch

            class Grid:
                def __getitem__(self, grid):
                    def run(*args, **kwargs):
                        launched.append(kwargs["ONE_TILE"])
                        kwargs.update(force)
                        return launch[grid](*args, **kwargs)
                    return run
            return Grid()
        return wrap

    grads = []
    for force in ({"ONE_TILE": False}, {}):
        monkeypatch.setattr(row_runs, "wrap_triton", spy(force))
        torch.manual_seed(9)
        ebc, _ = check_module(9, [8, 3, 7], True, backend="triton", deterministic=True, sparse=sparse, device=DEVICE)
        grad = next(ebc.parameters()).grad
        grads.append(grad.to_dense() if sparse else grad.clone())
    assert launched and all(launched), launched  # every launch could take the one-tile path
    assert torch.equal(grads[0], grads[1])


def test_pipelined_long_run_sums_give_the_legacy_loops_bits(monkeypatch):
    """The hot rows' sums (_long_run_sums_kernel) load a block's rows while they add the block
    before, and its offsets a block ahead of that: the same bits as their old loop
    (JAGGEDREC_LEGACY_LOOPS=1), both against the float64 reference (check_module), for runs of
    several blocks (every run of more than 2 contributions is a long run here)."""
    from jaggedrec.kernels import row_runs
    monkeypatch.setattr(row_runs, "LONG_RUN", 2)
    longest, original = [], row_runs.long_run_sums

    def spy(grad_out, runs, *args):
        num_runs = int(runs.num_runs)
        longest.append((int(runs.num_long), int(runs.run_start[1:num_runs + 1].sub(runs.run_start[:num_runs]).max())))
        return original(grad_out, runs, *args)

    monkeypatch.setattr(row_runs, "long_run_sums", spy)
    grads = []
    for legacy in ("1", "0"):
        monkeypatch.setenv("JAGGEDREC_LEGACY_LOOPS", legacy)
        torch.manual_seed(10)
        ebc, _ = check_module(10, [8, 3, 130], True, batch=10, max_len=16, backend="triton", deterministic=True,
                              device=DEVICE)
        grads.append(next(ebc.parameters()).grad.clone())
    block = row_runs._long_run_config()[0].kwargs["BLOCK_Q"]
    assert longest and all(n > 0 for n, _ in longest) and max(m for _, m in longest) > 2 * block, (longest, block)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dims", [[64] * 8, [128, 16, 4, 1024, 7]])
def test_gpu_realistic_sizes(dims):
    """GPU lane: realistic batches, compiled kernels, against the float64 reference."""
    check_module(8, dims, True, batch=512, max_len=40, backend="triton", device="cuda")


def test_check_skipped_ids_reports_what_compiled_graphs_counted():
    """A compiled graph only counts bad ids; check_skipped_ids() raises or warns afterwards."""
    configs, kjt = _bad_batch()
    for mode, expectation in (("raise", pytest.raises(ValueError, match="'item': 1")),
                              ("clamp", pytest.warns(RuntimeWarning, match="'item': 1"))):
        ebc = jr.EmbeddingBagCollection(configs, backend="triton", validate=False, bounds_check=mode, device=DEVICE)
        ebc.skipped_ids.add_(torch.tensor([0, 1], device=DEVICE))  # what the graph's counting adds
        with expectation:
            ebc.check_skipped_ids()
        ebc.check_skipped_ids()  # the counts were reset: nothing more to report
