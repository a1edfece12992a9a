"""The kernels' memory accesses as compiled for a GPU, checked on any machine.

On a GPU, an embedding row moved in 16-byte vectors takes a quarter of the instructions of
one moved a float at a time, and the gather kernels are bound by how many loads they keep
in flight. The compiler only vectorises what it can prove aligned, so the kernels promise
the layout's alignment (``tl.multiple_of``). This compiles them to sm_90 PTX (no GPU needed)
and checks that the row loads and stores come out as vectors when the dims allow it, and
as scalars when they don't (the promise is not made blindly).
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
# the probe drives triton.compile directly, whose arguments change between releases
pytestmark = pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6),
                                reason="the PTX probe is written against triton 3.6+ (checked with 3.6 and 3.9)")

# development tools, not installed: run as scripts from the checkout
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "tools")
PROBE = os.path.join(TOOLS, "ptx_probe.py")
REPORT = os.path.join(TOOLS, "codegen_report.py")


def _compile(mode):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, PROBE, str(mode)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def aligned():
    return _compile(16)


def test_row_traffic_is_vectorised_when_dims_allow(aligned):
    for kernel in ("fwd", "rows_grad", "fused_adagrad", "long_runs", "seq_fwd"):
        ops = aligned[kernel]
        assert ops.get("ld.global.v4.b32", 0) >= 4, (kernel, ops)  # the row gathers
    for kernel in ("fwd", "rows_grad", "fused_adagrad", "seq_fwd"):  # [BLOCK, 64] row writes
        assert aligned[kernel].get("st.global.v4.b32", 0) >= 4, (kernel, aligned[kernel])
    # quantized rows: INT8 codes and FP16 values in 16-byte vectors, INT4's half-width bytes in 8-byte ones
    # (a 32-bag tile of dim 64 gives each thread 8 of them), the pooled rows stored in vectors
    ops = aligned["quant_fwd"]
    assert ops.get("ld.global.v4.b32", 0) >= 2 and ops.get("ld.global.v2.b32", 0) >= 1, ops
    assert ops.get("st.global.v4.b32", 0) >= 4, ops
    # the run sums' gathers (two unrolled steps), not only the hot-row sums' load
    assert aligned["rows_grad"].get("ld.global.v4.b32", 0) >= 12, aligned["rows_grad"]


def test_atomic_backward_adds_without_fences(aligned):
    # deterministic=False: relaxed reductions (red), not acquire-release atomics that fence
    ops = aligned["rows_grad_atomic"]  # triton 3.9 emits red.global...relaxed, 3.6 atom.global...relaxed
    for kernel in ("rows_grad_atomic", "seq_grad_atomic"):
        ops = aligned[kernel]
        adds = [op for op in ops if op.startswith(("red.global", "atom.global"))]
        assert adds and all("relaxed" in op for op in adds), (kernel, ops)
    ops = aligned["rows_grad_atomic"]
    assert ops.get("ld.global.v4.b32", 0) >= 4 and aligned["psw_grad"].get("ld.global.v4.b32", 0) >= 4


def test_odd_dims_get_scalar_accesses():
    ops = _compile(1)
    for kernel in ("fwd", "rows_grad", "fused_adagrad", "long_runs", "rows_grad_atomic", "psw_grad", "seq_fwd",
                   "seq_grad_atomic", "quant_fwd"):
        assert not any(".v4" in op or ".v2" in op for op in ops[kernel]), (kernel, ops[kernel])


def test_every_kernel_variant_builds():
    """Every combination of constexpr switches at every autotune config, and every table, id
    and per-id weight dtype and dim layout at every config, compiles for sm_90 with this Triton
    (triton 3.6, on the GPU machines, could not build the backward's run sums, nor the forward
    without bounds checks at 32+ bags, which 3.9 built)."""
    result = _compile("sweep")
    assert not result["failed"], result["failed"]
    assert result["compiled"] == result["variants"] >= 219, result


# ----------------------------------------------------------------------------- loads in flight
# The machine-code report (benchmarks/tools/codegen_report.py) reads the SASS scoreboard bits of
# every variant the library launches for a workload; these workloads cover 32- and 16-bit
# tables, int64 and int32 ids, per-id weights, and dims that fill one 128-wide tile or not.
WORKLOADS = [["--dtype", "fp32", "--dim", "128", "--ids", "int64"],
             ["--dtype", "fp16", "--dim", "64", "--ids", "int32"],
             ["--dtype", "bf16", "--dim", "128", "--ids", "int64", "--weighted"]]
LOOP_BOUND = 2  # serial DRAM round trips per iteration of a gather or run loop


def _reports(tmp_path, workloads):
    """The report's readings for each workload (argument list), built two processes at a time."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out, running = {}, []
    for i, workload in enumerate(workloads):
        path = tmp_path / f"{i}.json"
        running.append((workload, path, subprocess.Popen(
            [sys.executable, REPORT, *workload, "--json", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
        if len(running) == 2 or i == len(workloads) - 1:
            for workload, path, process in running:
                stdout, stderr = process.communicate()
                assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
                out[" ".join(workload)] = json.load(open(path))
            running = []
    return out


@pytest.fixture(scope="module")
def readings(tmp_path_factory):
    return _reports(tmp_path_factory.mktemp("codegen"), WORKLOADS + [["--legacy-loops"]])


def test_every_loop_waits_at_most_two_round_trips_per_iteration(readings):
    loops = 0
    for workload, rows in readings.items():
        if "--legacy-loops" in workload:
            continue
        for r in rows:
            if r["loop"] is None:  # the long runs' sums and the atomic backward: no bound asked of them
                continue
            loops += 1
            assert r["round_trips"] <= LOOP_BOUND, (workload, r)
            assert r["local_bytes"] == 0, (workload, r)  # no spills
    assert loops >= 3 * (4 + 6 + 9), loops  # forward configs, dense and compact backward, three optimizers


def test_row_loads_are_16_byte_vectors_where_the_tile_allows(readings):
    for workload, rows in readings.items():
        for r in rows:
            if r["loop"] is None:
                continue
            # one position's [BLOCK, BLOCK_D] tile, spread over the program's threads: the forward's
            # 8-bag tile of dim-64 fp16 rows gives each thread 8 bytes, which no load can widen
            c = r["constexprs"]
            tile = c.get("BLOCK_B", c.get("BLOCK_U")) * c["BLOCK_D"] * r["row_bytes"]
            assert r["row_load_bytes"] == min(16, tile // (32 * r["num_warps"])), (workload, r)


def test_the_scoreboard_decoding_agrees_with_the_register_reads(readings):
    """Decoder check: every global load's result is read only after a wait on its scoreboard."""
    for workload, rows in readings.items():
        assert all(not r["unwaited"] for r in rows), [(workload, r["label"], r["unwaited"]) for r in rows if r["unwaited"]]


def test_the_legacy_loops_are_what_the_report_says_they_were(readings):
    """The round-trip count is not a constant: the loops this issue replaced read as more."""
    trips = [r["round_trips"] for r in readings["--legacy-loops"] if r["loop"] is not None]
    assert trips and max(trips) > LOOP_BOUND, trips
