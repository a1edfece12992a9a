"""A launch config that the installed Triton cannot build is dropped, not fatal (kernels/tuning.py).

No GPU needed: a subprocess without the interpreter gives triton a stand-in CUDA driver that
builds real sm_90 kernels but launches nothing (launches and timings are recorded instead), and
drives the three ways a config gets chosen: triton's autotuner in an eager launch, a lone config
(the interpreter's and JAGGEDREC_AUTOTUNE=0's), and torch.compile's tracing of ``wrap_triton``.
A config fails for real (a block over triton's tensor size limit), or through a build that
raises the way triton 3.6's failed MLIR pass did.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6),
                                reason="the stand-in driver is written against triton 3.6+ (checked with 3.6 and 3.9)")

TOO_BIG = 2 ** 22  # elements in one block: more than triton builds


@pytest.fixture(scope="module")
def observed():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_eager_launch_drops_configs_that_do_not_build(observed):
    seen = observed["eager"]
    # FLAG=True: the oversized block fails to build; FLAG=False: BLOCK=128 fails too (a switch
    # value is checked on its own, as the forward without bounds checks was the one 3.6 could not build)
    assert seen["flag"]["benchmarked"] and set(seen["flag"]["benchmarked"]) <= {64, 128}
    assert seen["flag"]["launched"] in (64, 128)
    assert seen["no_flag"]["launched"] == 64 and set(seen["no_flag"]["benchmarked"]) <= {64}
    warned = seen["flag"]["warnings"] + seen["no_flag"]["warnings"]
    assert len(seen["flag"]["warnings"]) == 1 and len(seen["no_flag"]["warnings"]) == 2, warned
    assert all(w.startswith("RuntimeWarning: jaggedrec: kernel _kernel does not build at config ") for w in warned)
    assert all(f"BLOCK={TOO_BIG}, num_warps=4" in w and "numel (4194304) exceeds" in w for w in warned[:2]), warned
    assert "BLOCK=128, num_warps=4" in warned[2] and "FLAG=False" in warned[2], warned
    assert warned[2].endswith("RuntimeError: PassManager::run failed"), warned  # the first line only
    assert seen["again"] == {"launched": 64, "benchmarked": [], "warnings": []}  # tuned and checked once


def test_lone_config_is_checked_and_a_launch_with_no_config_left_says_why(observed):
    seen = observed["single"]
    assert seen["good"] == {"launched": 64, "benchmarked": [], "warnings": []}
    assert seen["bad"].startswith("RuntimeError: jaggedrec: kernel _kernel builds at none of its 1 launch configs")
    assert f"BLOCK={TOO_BIG}" in seen["bad"] and "numel" in seen["bad"]
    assert seen["all_bad"].startswith("RuntimeError: jaggedrec: kernel _kernel builds at none of its 2 launch configs")


def test_torch_compile_tracing_hands_on_only_configs_that_build(observed):
    seen = observed["trace"]
    for mode in ("fake", "symbolic"):
        # the kernel the traced graph launches (what inductor compiles) has only the good configs
        assert seen[mode]["configs"] == [64], seen
        assert len(seen[mode]["warnings"]) == 1 and f"BLOCK={TOO_BIG}" in seen[mode]["warnings"][0], seen


def test_library_kernels_build_at_every_config_through_the_check(observed):
    """The forward (whose loop triton 3.6 once could not build without bounds checks): all its configs survive."""
    seen = observed["library"]
    assert seen["warnings"] == [] and seen["configs"] == seen["all_configs"] and len(seen["configs"]) >= 4, seen


# ---------------------------------------------------------------------------------------------
# The subprocess (``python test_autotune_pruning.py``), with TRITON_INTERPRET=0.

def _observe():
    import torch
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from jaggedrec.kernels import tuning

    records = {"launched": None, "benchmarked": []}

    class StandInDriver:
        """Enough of triton's active driver to build for an sm_90 GPU; nothing is launched."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            def bench(kernel_call, quantiles):
                kernel_call()
                records["benchmarked"].append(records.pop("launched"))
                return [1.0, 1.0, 1.0]
            return bench

    triton.runtime.driver.set_active(StandInDriver())

    def kernel(configs):
        @tuning.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=4) for b in configs], key=[])
        @triton.jit
        def _kernel(x_ptr, n, BLOCK: tl.constexpr, FLAG: tl.constexpr):
            i = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + i, mask=i < n)
            if FLAG:
                x = x * 2
            tl.store(x_ptr + i, x, mask=i < n)

        build_for_real = _kernel.fn.run

        def run(*args, grid, warmup, **kwargs):  # builds happen; the launch is recorded instead
            if warmup:
                return build_for_real(*args, grid=grid, warmup=True, **kwargs)
            records["launched"] = kwargs["BLOCK"]
        _kernel.fn.run = run
        return _kernel

    real_build = tuning.build

    def build(fn, args, kwargs, config):  # BLOCK=128 without FLAG fails as 3.6's layout pass did
        if config.kwargs.get("BLOCK") == 128 and not kwargs["FLAG"]:
            raise RuntimeError("PassManager::run failed\n(the MLIR pass's report)")
        real_build(fn, args, kwargs, config)
    tuning.build = build

    def launch(k, **constexprs):
        records.update(launched=None, benchmarked=[])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k[(1,)](torch.zeros(8), 8, **constexprs)
        return dict(records, warnings=[f"{w.category.__name__}: {w.message}" for w in caught])

    def error(k, **constexprs):
        try:
            launch(k, **constexprs)
        except RuntimeError as e:
            return f"RuntimeError: {e}"
        return None

    # eager launches through triton's autotuner, then lone configs
    seen = {}
    k = kernel([TOO_BIG, 64, 128])
    seen["eager"] = {"flag": launch(k, FLAG=True), "no_flag": launch(k, FLAG=False), "again": launch(k, FLAG=False)}
    seen["single"] = {"good": launch(kernel([64]), FLAG=True), "bad": error(kernel([TOO_BIG]), FLAG=True),
                      "all_bad": error(kernel([TOO_BIG, 128]), FLAG=False)}

    # torch.compile: tracing wrap_triton (as inside a triton_op) with fake tensors and with
    # symbolic sizes; the graph's kernel is what inductor would build and launch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.library import wrap_triton

    seen["trace"] = {}
    for mode in ("fake", "symbolic"):
        k = kernel([TOO_BIG, 64])

        def f(x):
            wrap_triton(k)[lambda meta: (1,)](x, x.shape[0], FLAG=True)
            return x
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = make_fx(f, tracing_mode=mode)(torch.zeros(8))
        launches = [n for n in graph.graph.nodes if "kernel_idx" in n.kwargs]
        assert len(launches) == 1, graph.code
        traced = kernel_side_table.get_kernel(launches[0].kwargs["kernel_idx"])
        seen["trace"][mode] = {"configs": [c.kwargs["BLOCK"] for c in traced.configs],
                               "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}

    # the library's forward, checked at argument dtypes (as when traced)
    from jaggedrec.kernels import pooled_fwd

    k = pooled_fwd._pooled_fwd_kernel
    types = dict(weights_ptr=torch.float32, values_ptr=torch.int64, offsets_ptr=torch.int64, psw_ptr=torch.float32,
                 inverse_ptr=torch.int64, meta_ptr=torch.int64, out_ptr=torch.float32, bad_ids_ptr=torch.int64,
                 batch_size=3, bag_stride=3, out_stride=3, num_features=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = k.early_config_prune(k.configs, types, HAS_PSW=False, HAS_INVERSE=False, BLOCK_D=64, DIM_ALIGN=4,
                                    LEGACY_LOOPS=False)
    seen["library"] = {"configs": [tuning._describe(c) for c in kept],
                       "all_configs": [tuning._describe(c) for c in k.configs],
                       "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}
    return seen


if __name__ == "__main__":
    print(json.dumps(_observe()))
