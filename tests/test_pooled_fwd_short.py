"""The short-bag forward (kernels/pooled_fwd_short.py) under Triton's interpreter: against a
float64 loop over the bags, and bit for bit against the general forward kernel
(kernels/pooled_fwd.py) on the same inputs."""

import pytest
import torch
import torch.nn.functional as F

from jaggedrec.kernels import legacy_loops, pooled_fwd, pooled_fwd_short
from jaggedrec.ops import pooled_triton
from jaggedrec.ops.feature_tables import FeatureTables
from jaggedrec.ops.op_args import OpBatch

# four features over three tables of one flat weight tensor (rows 11, 6, 9; dims 8, 16, 4),
# keys shuffled against the features; key 1 read by two features; feature 2 pools by MEAN
TABLES = FeatureTables((0, 88, 88, 184), (11, 6, 6, 9), (8, 16, 16, 4), (2, 1, 1, 0), (0, 0, 1, 0), 3)


def _case(seed, batch_size, lengths_from, id_dtype, weighted, inverse, bad, dtype):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(220, generator=gen).to(dtype)
    num_keys = TABLES.num_keys
    slots = batch_size if not inverse else batch_size - 2
    lengths = torch.tensor(lengths_from, dtype=torch.int64)[torch.randint(0, len(lengths_from), (num_keys * slots,),
                                                                          generator=gen)]
    lengths[slots:2 * slots] = 0 if seed % 2 else lengths[slots:2 * slots]  # a key with no ids
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(id_dtype)
    n = int(offsets[-1])
    values = torch.randint(0, 6, (n,), generator=gen)
    if bad and n:
        values[torch.randint(0, n, (max(1, n // 8),), generator=gen)] = 10  # bad for the 6- and 9-row tables
        values[-1] = -3
    psw = torch.rand(n, generator=gen) if weighted else None
    inverse_indices = torch.randint(0, slots, (TABLES.num_features, batch_size), generator=gen) if inverse else None
    return weights, OpBatch(values.to(id_dtype), offsets, psw, inverse_indices), slots


def _reference(weights, batch, slots, batch_size):
    """float64 loop: per feature and sample, the bag's rows (bad ids skipped), SUM or MEAN."""
    out = torch.zeros(batch_size, sum(TABLES.dims), dtype=torch.float64)
    column = 0
    for f in range(TABLES.num_features):
        dim, rows = TABLES.dims[f], TABLES.rows[f]
        table = weights[TABLES.weight_offsets[f]:TABLES.weight_offsets[f] + rows * dim].double().view(rows, dim)
        for b in range(batch_size):
            bag = int(batch.inverse_indices[f, b]) if batch.inverse_indices is not None else b
            lo, hi = int(batch.offsets[TABLES.keys[f] * slots + bag]), int(batch.offsets[TABLES.keys[f] * slots + bag + 1])
            for i in range(lo, hi):
                row = int(batch.values[i])
                if 0 <= row < rows:
                    w = 1.0 if batch.per_sample_weights is None else float(batch.per_sample_weights[i])
                    out[b, column:column + dim] += w * table[row]
            if TABLES.pooling[f]:
                out[b, column:column + dim] /= max(hi - lo, 1)
        column += dim
    return out


def _bad_reference(batch, slots):
    bad = torch.zeros(TABLES.num_features, dtype=torch.int64)
    for f in range(TABLES.num_features):
        bags = range(slots) if batch.inverse_indices is None else sorted(set(batch.inverse_indices[f].tolist()))
        for bag in bags:
            lo, hi = int(batch.offsets[TABLES.keys[f] * slots + bag]), int(batch.offsets[TABLES.keys[f] * slots + bag + 1])
            bad[f] += sum(1 for i in range(lo, hi) if not 0 <= int(batch.values[i]) < TABLES.rows[f])
    return bad


@pytest.mark.parametrize("seed,batch_size,lengths_from,id_dtype,weighted,inverse,bad,dtype", [
    (0, 9, (1,), torch.int64, False, False, False, torch.float32),          # DLRM: one id per bag
    (1, 7, (0, 1), torch.int32, True, False, True, torch.float32),         # empty bags, weighted, bad ids
    (2, 11, (0, 1, 2, 5), torch.int64, False, False, True, torch.float32),  # mixed: bags past SHORT finish in the tail
    (3, 6, (1, 2), torch.int32, True, False, False, torch.float16),
    (4, 8, (0, 1, 3), torch.int64, False, True, False, torch.float32),      # VBE
])
def test_short_kernel_matches_reference_and_general_kernel(seed, batch_size, lengths_from, id_dtype, weighted,
                                                           inverse, bad, dtype):
    weights, batch, slots = _case(seed, batch_size, lengths_from, id_dtype, weighted, inverse, bad, dtype)
    meta = TABLES.meta(weights)
    outs = []
    for launch in ("short", "general"):
        out = torch.full((batch_size, sum(TABLES.dims)), float("nan"))
        bad_ids = torch.zeros(TABLES.num_features, dtype=torch.int64)
        if launch == "short":
            # the kernel takes any lengths: where the op would pick the general kernel, SHORT 2
            short = pooled_triton.short_length(batch.num_ids, TABLES.num_keys * slots, max(TABLES.dims)) or 2
            pooled_fwd_short.pooled_fwd_short(weights, batch, meta, out, bad_ids, max(TABLES.dims), 4, slots, short)
        else:
            pooled_fwd.pooled_fwd(weights, batch, meta, out, bad_ids, max(TABLES.dims), 4, slots)
        outs.append((out, bad_ids))
    (short_out, short_bad), (general_out, general_bad) = outs
    torch.testing.assert_close(short_out.double(), _reference(weights, batch, slots, batch_size), rtol=1e-5, atol=1e-5)
    assert torch.equal(short_out, general_out)  # the same bits, every case
    if not inverse:
        assert torch.equal(short_bad, _bad_reference(batch, slots))
    assert torch.equal(short_bad, general_bad)


def test_chosen_by_bag_length(monkeypatch):
    monkeypatch.setattr(legacy_loops, "enabled", lambda: False)
    assert pooled_triton.short_length(4096, 4096, 64) == 1   # DLRM: one id per bag
    assert pooled_triton.short_length(6000, 4096, 128) == 2
    assert pooled_triton.short_length(20 * 4096, 4096, 64) == 0  # long bags: the general kernel
    assert pooled_triton.short_length(4096, 4096, 256) == 0      # wider than one tile
    assert pooled_triton.short_length(0, 0, 64) == 0


def test_forward_takes_the_short_kernel_for_short_bags(monkeypatch):
    """The op's Triton forward launches the short-bag kernel at about one id per bag and the
    general one otherwise, with the same output either way."""
    monkeypatch.setattr(legacy_loops, "enabled", lambda: False)
    launched = []
    for name, module in (("short", pooled_fwd_short), ("general", pooled_fwd)):
        launch = getattr(module, "pooled_fwd_short" if name == "short" else "pooled_fwd")
        monkeypatch.setattr(module, launch.__name__,
                            lambda *a, _launch=launch, _name=name, **k: (launched.append(_name), _launch(*a, **k))[1])
    for lengths_from, expected in (((1,), "short"), ((0, 1, 2), "short"), ((3, 6), "general")):
        weights, batch, slots = _case(5, 6, lengths_from, torch.int64, False, False, False, torch.float32)
        launched.clear()
        out, bad = pooled_triton.triton_forward(weights, batch, TABLES)
        assert launched == [expected]
        torch.testing.assert_close(out.double(), _reference(weights, batch, slots, 6), rtol=1e-5, atol=1e-5)


READ = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import sass
from codegen_report import compile_kernel, cuobjdump, resources
from jaggedrec.kernels import pooled_fwd_short as pfs
types = dict(weights_ptr="*fp32", values_ptr="*i64", offsets_ptr="*i64", psw_ptr="*fp32", inverse_ptr="*i64",
             meta_ptr="*i64", out_ptr="*fp32", bad_ids_ptr="*i64", batch_size="i32", bag_stride="i32",
             out_stride="i32", num_features="i32")
out = []
for psw in (False, True):
    for short in (1, 2):
        consts = dict(HAS_PSW=psw, HAS_INVERSE=False, BLOCK_D=64, DIM_ALIGN=4, SHORT=short, BLOCK_B=32,
                      PROGRAMS_PER_SM=2)
        compiled = compile_kernel(pfs._pooled_fwd_short_kernel, types, consts, 4)  # autotuned: its .fn is built
        code = next(iter(sass.parse(sass.disassemble(compiled.asm["cubin"], cuobjdump())).values()))
        loop = max(sass.loops(code), key=lambda se: se[1] - se[0])
        timing = sass.simulate(code, *loop)
        out.append(dict(psw=psw, short=short, round_trips=timing.round_trips, load_bytes=timing.load_bytes,
                        spills=sum(1 for i in code if i.base in ("STL", "LDL")),
                        registers=resources(compiled.asm["cubin"])["registers"]))
print(json.dumps(out))
'''


def test_machine_code_one_round_trip_per_block():
    """sm_90a machine code of the DLRM-shaped variants (fp32, dim 64, 32 bags, 4 warps): the
    persistent loop waits for one DRAM round trip per block, loads rows 16 bytes at a time and
    spills nothing, on the installed Triton (CI's second lane: 3.6)."""
    import json
    import os
    import subprocess
    import sys
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip("the machine-code reader is written against triton 3.6+")
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools")
    done = subprocess.run([sys.executable, "-c", READ, tools], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="0"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in json.loads(done.stdout.splitlines()[-1]):
        assert variant["round_trips"] == 1, variant
        assert variant["load_bytes"] == 16 and variant["spills"] == 0, variant
