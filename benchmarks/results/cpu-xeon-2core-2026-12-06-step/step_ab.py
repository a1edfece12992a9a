"""jaggedrec's fused train step against FBGEMM's CPU TBE with the same EmbOptimType, one sitting.

dlrm preset: 26 tables x 100k rows, dim 64, batch 4096, L ids per bag (fixed, uniform ids).
Quiet, then (with --busy) beside one process spinning on a core. Providers alternate within
each round; 3 batches rotate; medians in ms. With --before DIR, jaggedrec is also run from the
tree in DIR (a `git worktree add DIR <commit>`): a second copy of the package is imported from
that tree, so both run in the same process and the same rounds. BUT the ops of both copies are
registered under one name (torch.library), so the copy imported last serves both: --before
does not compare the update's code. Use step_trees.py (one process per tree) for that.

    python step_ab.py L THREADS REPS OPTIMIZER [--busy] [--before DIR]

OPTIMIZER: FBGEMM's EmbOptimType name, lower case (exact_sgd, exact_rowwise_adagrad, exact_adagrad).
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("L", type=int)
ap.add_argument("threads", type=int)
ap.add_argument("reps", type=int)
ap.add_argument("optimizer")
ap.add_argument("--busy", action="store_true", help="also measure beside one busy process")
ap.add_argument("--before", help="a checkout of the tree before the change: its jaggedrec runs beside")
ap.add_argument("--no-fbgemm", action="store_true")
ap.add_argument("--cpu-time", action="store_true",
                help="time the calling thread's CPU time, not wall time: steadier on a loaded machine, "
                     "but it counts only the calling thread's work (use with 1 thread)")
args = ap.parse_args()
T, R, D, B = 26, 100_000, 64, 4096
torch.set_num_threads(args.threads)


def load_jaggedrec(root):
    """Import the jaggedrec package under ``root`` as a separate copy (its own module names)."""
    import os
    saved = {k: v for k, v in sys.modules.items() if k == "jaggedrec" or k.startswith("jaggedrec.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location("jaggedrec", os.path.join(root, "jaggedrec", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(root, "jaggedrec")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["jaggedrec"] = mod
        spec.loader.exec_module(mod)
        import jaggedrec.distributed.fused_params as fp  # noqa: F401  (from root)
        pkg = {k: v for k, v in sys.modules.items() if k == "jaggedrec" or k.startswith("jaggedrec.")}
        return mod, pkg["jaggedrec.distributed.fused_params"]
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if k == "jaggedrec" or k.startswith("jaggedrec.")]:
            del sys.modules[k]
        sys.modules.update(saved)


torch.manual_seed(0)
tables = [torch.empty(R, D).uniform_(-0.01, 0.01) for _ in range(T)]


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((T * B,), args.L)
    values = torch.randint(0, R, (T * B * args.L,), generator=g)
    return values, lengths, torch.nn.functional.pad(lengths.cumsum(0), (1, 0))


batches = [batch(s) for s in range(3)]
grad = torch.randn(B, T * D)


def jaggedrec_provider(jr, fp):
    cfg = [jr.EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=R, feature_names=[f"f{i}"])
           for i in range(T)]
    opt = fp.fused_optimizer_from_params({"optimizer": args.optimizer.upper(), "learning_rate": 0.01})
    ebc = jr.EmbeddingBagCollection(cfg, fused_optimizer=opt)
    ebc.load_state_dict({f"embedding_bags.t{i}.weight": t for i, t in enumerate(tables)}, strict=False)
    kjts = [jr.KeyedJaggedTensor([f"f{i}" for i in range(T)], v, lengths=l) for v, l, _ in batches]
    return lambda i: ebc(kjts[i % 3]).values().backward(grad)


provs = []
if args.before:
    provs.append(("before", jaggedrec_provider(*load_jaggedrec(args.before))))
import jaggedrec  # noqa: E402
import jaggedrec.distributed.fused_params as fused_params  # noqa: E402
provs.append(("jaggedrec", jaggedrec_provider(jaggedrec, fused_params)))
if not args.no_fbgemm:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T, optimizer=EmbOptimType[args.optimizer.upper()],
        learning_rate=0.01, weights_precision=SparseType.FP32, output_dtype=SparseType.FP32,
        pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
    with torch.no_grad():
        for t, w in enumerate(tbe.split_embedding_weights()):
            w.copy_(tables[t])

    def fb_step(i):
        v, _, o = batches[i % 3]
        tbe(v, o).backward(grad)
    provs.append(("fbgemm", fb_step))
for _, f in provs:
    f(0)
    f(1)


clock = time.thread_time if args.cpu_time else time.perf_counter


def measure(busy):
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.3)
        res = {n: [] for n, _ in provs}
        for i in range(args.reps):
            k = i % len(provs)
            for name, f in provs[k:] + provs[:k]:
                t = clock()
                f(i)
                res[name].append(1000 * (clock() - t))
        return {k: statistics.median(v) for k, v in res.items()}
    finally:
        if proc:
            proc.kill()
            proc.wait()


for busy in (False, True) if args.busy else (False,):
    load = open("/proc/loadavg").read().split()[:3]
    r = measure(busy)
    ratio = f"; fbgemm/jaggedrec {r['fbgemm'] / r['jaggedrec']:.2f}" if "fbgemm" in r else ""
    before = f", before/after {r['before'] / r['jaggedrec']:.2f}" if "before" in r else ""
    print(f"{args.optimizer} L={args.L} threads={args.threads} {'contended' if busy else 'quiet    '} "
          f"{'thread CPU' if args.cpu_time else 'wall'} "
          f"(load {' '.join(load)}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in r.items()) + ratio + before,
          flush=True)
