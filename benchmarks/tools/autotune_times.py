"""Every autotune config's time, for the forward, the backward and each fused step, on a GPU.

    python benchmarks/tools/autotune_times.py --output autotune.json    # dlrm's cuda shape

Triton's autotuner times every config of a kernel on its first launch for each tuning key,
keeps the fastest, and remembers the times in ``configs_timings``. This runs one step of each
kind at a preset's shape, with the pipelined loops and with the loops they replaced
(``JAGGEDREC_LEGACY_LOOPS``, a constexpr and so part of the tuning key), and prints and saves
every config's time, so that the configs (and the two loops) are compared on real hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

from jaggedrec.benchmarks.presets import PRESETS, preset_workloads
from jaggedrec.benchmarks.workload import make_batches


def _timings(kernel) -> Dict[str, float]:
    timings = getattr(kernel, "configs_timings", None) or {}
    out = {}
    for config, t in timings.items():
        ms = t[0] if isinstance(t, (list, tuple)) else t
        name = ", ".join([f"{k}={v}" for k, v in config.kwargs.items()] + [f"num_warps={config.num_warps}"])
        out[name] = float(ms)
    return out


def run(preset: str, device: str) -> List[dict]:
    import jaggedrec as jr
    from jaggedrec import optim
    from jaggedrec.kernels import pooled_fused, pooled_fwd, pooled_fwd_short, row_runs

    w = preset_workloads(preset, device)[0]
    batch = make_batches(w, 1)[0]
    keys = [f"f{t}" for t in range(w.tables)]
    kjt = jr.KeyedJaggedTensor(keys, batch.values, lengths=batch.lengths)
    configs = [jr.EmbeddingBagConfig(name=f"t{t}", embedding_dim=w.dims[t % len(w.dims)],
                                     num_embeddings=w.num_embeddings, feature_names=[f"f{t}"])
               for t in range(w.tables)]
    # the forward of short bags (about one id per bag) is the pipelined short-bag kernel, of
    # longer ones (and under the legacy loops) the general one: both are read, one stays empty
    kernels = {"forward": [pooled_fwd._pooled_fwd_kernel, pooled_fwd_short._pooled_fwd_short_kernel],
               "backward": [row_runs._rows_grad_kernel], "fused": [pooled_fused._fused_update_kernel]}
    rows = []
    for legacy in ("1", "0"):
        os.environ["JAGGEDREC_LEGACY_LOOPS"] = legacy
        for step, optimizer in (("forward", None), ("backward", None), ("fused SGD", optim.SGD(lr=0.01)),
                                ("fused RowWiseAdagrad", optim.RowWiseAdagrad(lr=0.01)),
                                ("fused Adam", optim.Adam(lr=0.01))):
            ebc = jr.EmbeddingBagCollection(configs, device=device, backend="triton", validate=False,
                                            fused_optimizer=optimizer)
            if step == "forward":
                with torch.no_grad():
                    ebc(kjt)
            else:
                ebc(kjt).values().sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            for kernel in kernels[step.split()[0]]:
                rows.append({"loops": "legacy" if legacy == "1" else "pipelined", "step": step,
                             "kernel": kernel.fn.__name__, "ms": _timings(kernel)})
                print(json.dumps(rows[-1]), flush=True)
            del ebc
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/tools/autotune_times.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dlrm", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the steps under TRITON_INTERPRET=1 (no timings)")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("autotune_times: no CUDA device; the autotuner times configs only on a GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("JAGGEDREC_AUTOTUNE", "1")
    rows = run(args.preset, args.device)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
