"""The backward's index kernels (kernels/run_index.py) against the torch ops they replace
(runs_triton's *_reference functions), under Triton's interpreter: the same contributions and
the same runs, entry for entry, where the runs say an entry is defined."""

import pytest
import torch
import torch.nn.functional as F

from jaggedrec.kernels import row_runs
from jaggedrec.ops import pooled_triton, runs_triton, sequence_triton
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import OpBatch

# three tables (rows 7, 5, 9; dims 8, 16, 8) read by four features; key 1 is read by two
# tables, so the plan needs two passes; feature 3 pools by MEAN
TABLES = FeatureTables((0, 56, 136, 136), (7, 5, 9, 9), (8, 16, 8, 8), (0, 1, 1, 2), (0, 0, 0, 1), 3)
WEIGHTS = torch.randn(208)


def _batch(seed, batch_size, max_length, id_dtype, bad, weighted, inverse=False):
    gen = torch.Generator().manual_seed(seed)
    num_keys = TABLES.num_keys
    lengths = torch.randint(0, max_length + 1, (num_keys * batch_size,), generator=gen)
    lengths[::5] = 0  # empty bags
    lengths[:batch_size] = torch.where(torch.rand(batch_size, generator=gen) < 0.5, 0, lengths[:batch_size])
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
    n = int(offsets[-1])
    values = torch.randint(0, 5, (n,), generator=gen)  # few rows: long runs of duplicates
    if bad and n:
        values[torch.randint(0, n, (max(1, n // 10),), generator=gen)] = 11  # past every table but one
        values[0] = -1
    psw = torch.rand(n, generator=gen) if weighted else None
    inverse_indices = None
    if inverse:
        # samples read only the first half of the slots: the others' ids are masked
        inverse_indices = torch.randint(0, max(1, batch_size // 2), (TABLES.num_features, batch_size + 2), generator=gen)
    return OpBatch(values.to(id_dtype), offsets, psw, inverse_indices)


def _assert_runs_equal(got, want):
    m = got.item_offset.shape[0]
    num_runs, num_long = int(want.num_runs), int(want.num_long)
    assert torch.equal(got.num_runs, want.num_runs) and torch.equal(got.num_long, want.num_long)
    assert torch.equal(got.run_start[:m + 1], want.run_start[:m + 1])
    assert torch.equal(got.run_row[:num_runs], want.run_row[:num_runs])
    assert torch.equal(got.run_feature[:num_runs], want.run_feature[:num_runs])
    assert torch.equal(got.item_offset, want.item_offset)
    assert (got.item_scale is None) == (want.item_scale is None)
    if want.item_scale is not None:
        assert torch.equal(got.item_scale, want.item_scale)
    assert torch.equal(got.long_rank, want.long_rank)
    assert torch.equal(got.long_runs[:num_long], want.long_runs[:num_long])


@pytest.mark.parametrize("seed,batch_size,max_length,id_dtype,bad,weighted,inverse", [
    (0, 6, 4, torch.int64, False, False, False),
    (1, 5, 9, torch.int32, True, True, False),
    (2, 3, 40, torch.int64, True, False, False),   # runs past LONG_RUN
    (3, 4, 6, torch.int64, False, True, True),     # VBE: ids of unread bags masked
    (4, 1, 0, torch.int32, False, False, False),   # no ids at all
])
def test_kernels_match_torch_ops(seed, batch_size, max_length, id_dtype, bad, weighted, inverse, monkeypatch):
    monkeypatch.setattr(row_runs, "LONG_RUN", 3)
    batch = _batch(seed, batch_size, max_length, id_dtype, bad, weighted, inverse)
    meta = TABLES.meta(WEIGHTS)
    parts = runs_triton.contributions(batch, TABLES, meta)
    want_parts = runs_triton.contributions_reference(batch, TABLES, meta)
    for name, a, b in zip(parts._fields, parts, want_parts):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if batch.num_ids:  # the case exercises what it says: live rows, and masked ones where expected
        assert (parts.rows >= 0).any()
        assert (parts.rows < 0).any() or not (bad or inverse)
    grad_out = torch.randn(batch.bags_per_key(TABLES.num_keys), 40)
    gradient_rows = pooled_triton._bag_rows(grad_out, batch, TABLES, meta)
    _assert_runs_equal(runs_triton.sorted_runs(parts, WEIGHTS, gradient_rows),
                       runs_triton.sorted_runs_reference(want_parts, WEIGHTS, gradient_rows))


def test_sequence_runs_match(monkeypatch):
    monkeypatch.setattr(row_runs, "LONG_RUN", 2)
    batch = _batch(7, 5, 7, torch.int64, True, False)
    meta = TABLES.meta(WEIGHTS)
    parts = runs_triton.contributions(batch, TABLES, meta)
    item_offset = sequence_triton._item_offsets(batch, TABLES, meta)

    def gradient_rows(order, feature):
        return item_offset(order, feature), None
    _assert_runs_equal(runs_triton.sorted_runs(parts, WEIGHTS, gradient_rows),
                       runs_triton.sorted_runs_reference(parts, WEIGHTS, gradient_rows))


BUILD = r'''
import sys
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
from codegen_report import compile_kernel
from jaggedrec.kernels import run_index
i32, i64 = "i32", "i64"
builds = {
    "contributions": (run_index._contributions_kernel,
                      dict(values_ptr="*i64", offsets_ptr="*i64", pass_features_ptr="*i32", meta_ptr="*i64",
                           bag_read_ptr="*i1", feature_ptr="*i32", rows_ptr="*i64", bag_ptr="*i64", num_ids=i64,
                           num_bags=i64, batch_size=i32, num_keys=i32, num_passes=i32),
                      dict(HAS_BAG_READ=True, BLOCK_B=run_index.BLOCK)),
    "run_marks": (run_index._run_marks_kernel,
                  dict(sorted_rows_ptr="*i32", order_ptr="*i64", feature_ptr="*i32", starts_ptr="*i32",
                       sorted_feature_ptr="*i64", bag_ptr="*i64", offsets_ptr="*i32", psw_ptr="*fp32",
                       meta_ptr="*i64", item_offset_ptr="*i64", scale_ptr="*fp32", num=i64, num_values=i64,
                       batch_size=i32, row_stride=i32),
                  dict(BAG_ROWS=True, HAS_PSW=True, HAS_MEAN=True, BLOCK_M=run_index.BLOCK)),
    "run_layout": (run_index._run_layout_kernel,
                   dict(sorted_rows_ptr="*i32", starts_ptr="*i32", rank_ptr="*i64", sorted_feature_ptr="*i64",
                        run_start_ptr="*i64", run_row_ptr="*i64", run_feature_ptr="*i64", num_runs_ptr="*i64",
                        num=i64), dict(BLOCK_M=run_index.BLOCK)),
    "long_marks": (run_index._long_marks_kernel,
                   dict(run_start_ptr="*i64", num_runs_ptr="*i64", marks_ptr="*i32", num=i64),
                   dict(LONG=32, BLOCK_M=run_index.BLOCK)),
    "long_layout": (run_index._long_layout_kernel,
                    dict(marks_ptr="*i32", rank_ptr="*i64", long_rank_ptr="*i64", long_runs_ptr="*i64",
                         num_long_ptr="*i64", num=i64), dict(BLOCK_M=run_index.BLOCK)),
}
# every switch of the two kernels that have them
for read in (False, True):
    builds[f"contributions read={read}"] = (builds["contributions"][0],
                                             dict(builds["contributions"][1], values_ptr="*i32"),
                                             dict(HAS_BAG_READ=read, BLOCK_B=run_index.BLOCK))
for bag_rows, psw, mean in [(False, False, False), (True, False, False), (True, True, False), (True, False, True)]:
    builds[f"run_marks {bag_rows} {psw} {mean}"] = (builds["run_marks"][0],
                                                   dict(builds["run_marks"][1], psw_ptr="*fp16"),
                                                   dict(BAG_ROWS=bag_rows, HAS_PSW=psw, HAS_MEAN=mean,
                                                        BLOCK_M=run_index.BLOCK))
for name, (kernel, types, constexprs) in builds.items():
    # compile_kernel takes what the library launches: dressed as an autotuned kernel (its .fn
    # the jit function), which every version of the tool reads
    compiled = compile_kernel(SimpleNamespace(fn=kernel, configs=[]), types, constexprs, num_warps=4)
    assert ".local" not in compiled.asm["ptx"], name
    if constexprs.get("HAS_MEAN"):  # MEAN's 1/length correctly rounded, as torch's reciprocal
        assert "div.rn.f32" in compiled.asm["ptx"], name
    print(name, compiled.n_regs if hasattr(compiled, "n_regs") else "")
print("built", len(builds))
'''


def test_kernels_build_for_sm90():
    """The five kernels compile for sm_90a at every switch (no GPU needed; the lane with
    triton 3.6 runs it too), with no local memory."""
    import os
    import subprocess
    import sys
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip("the build helper is written against triton 3.6+")
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools")
    out = subprocess.run([sys.executable, "-c", BUILD, tools], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built 11" in out.stdout
