"""``jaggedrec-bench --module mc``: hash tables (managed collisions) on raw ids.

Two measurements in one run, on the same batches of raw int64 ids (skewed: a few ids are
frequent, most rare, drawn from ``--id-space`` times the table's rows, so that every batch
looks ids up, places new ones and evicts):

- **remap + lookup** (training mode, no backward: ids are placed and evicted as in training,
  then the rows pooled): jaggedrec's ``HashEmbeddingBagCollection`` (LRU) against TorchRec's
  ``ManagedCollisionEmbeddingBagCollection`` over ``MCHManagedCollisionModule`` (LRU), which
  places new ids only when it evicts: every batch (``torchrec_mch[1]``) and every tenth
  (``torchrec_mch[10]``). Reported as ids per second.
- **train step** (forward, backward, fused RowWiseAdagrad): the hashed tables against the same
  tables static (``EmbeddingBagCollection`` fed the ids modulo the rows), as a ratio. With
  ``--same-rows`` also against the static tables fed the very rows the hashed tables read
  (``train_static_same_rows``: the rows a second hashed collection gave the same batches in
  its steady state): ids modulo the rows collide, so that static step updates fewer distinct
  rows (about 9% fewer on the default preset), and only this second ratio isolates what the
  hashing itself costs.

Providers alternate within each round; figures are medians over rounds, of the wall clock and
of the calling thread's CPU time (``time.thread_time``; with ``--threads 1`` all of the work):
on a loaded machine the wall clock of a step longer than a scheduler slice mostly measures
preemption, the CPU time much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

PRESETS = {
    "default": dict(tables=4, num_embeddings=100_000, dim=64, batch_size=2048, pooling_factor=8, id_space=10.0),
    "tiny": dict(tables=2, num_embeddings=257, dim=8, batch_size=16, pooling_factor=3, id_space=4.0),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaggedrec-bench --module mc", description=__doc__.split("\n\n")[0])
    p.add_argument("--module", default="mc")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for name in ("tables", "num-embeddings", "dim", "batch-size"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--pooling-factor", type=int)
    p.add_argument("--id-space", type=float, help="raw ids drawn from this many times the rows of a table")
    p.add_argument("--bucket-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10, help="rounds; each times every provider once a batch")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-torchrec", action="store_true")
    p.add_argument("--same-rows", action="store_true",
                   help="also time the static tables fed the rows the hashed tables read (train_static_same_rows)")
    p.add_argument("--output", help="write the figures as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _workload(args) -> Dict[str, float]:
    w = dict(PRESETS[args.preset])
    for key in w:
        value = getattr(args, key)
        if value is not None:
            w[key] = value
    return w


def _batches(w, count: int, seed: int, device: str):
    """``count`` pairs (raw-id KJT, static-id KJT): the same bags, ids skewed toward small ranks."""
    import jaggedrec as jr

    gen = torch.Generator().manual_seed(seed)
    keys = [f"f{t}" for t in range(w["tables"])]
    space = int(w["id_space"] * w["num_embeddings"])
    out = []
    for _ in range(count):
        lengths = torch.randint(0, 2 * w["pooling_factor"] + 1, (len(keys) * w["batch_size"],), generator=gen)
        ranks = (torch.rand(int(lengths.sum()), generator=gen).pow(3) * space).long()
        raw = ranks * -7046029254386353131 + 12345  # spread the ranks over int64 (wrapping)
        static = raw.remainder(w["num_embeddings"] - 1)
        out.append(tuple(jr.KeyedJaggedTensor(keys, v.to(device), lengths=lengths.to(device)) for v in (raw, static)))
    return keys, out


def _configs(w):
    import jaggedrec as jr

    return [jr.EmbeddingBagConfig(name=f"t{t}", embedding_dim=w["dim"], num_embeddings=w["num_embeddings"],
                                  feature_names=[f"f{t}"]) for t in range(w["tables"])]


def _same_rows(w, args, device: str, batches):
    """``[static-row KJT]`` a batch: the rows a hashed collection (the train step's options)
    reads for each batch once every batch has been seen twice (the steady state)."""
    from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

    options = {f"t{t}": HashTableOptions(bucket_size=args.bucket_size, eviction="lru", unplaced="fallback")
               for t in range(w["tables"])}
    shadow = HashEmbeddingBagCollection(_configs(w), options, device=device, backend="torch")
    with torch.no_grad():
        for _ in range(2):
            for raw, _static in batches:
                shadow.remap(raw)
        return [shadow.remap(raw) for raw, _static in batches]


def _providers(w, args, device: str) -> Dict[str, Callable]:
    """name -> (kind, step(raw_kjt, static_kjt)); built once, their tables all alike at start."""
    import jaggedrec as jr
    from jaggedrec import optim
    from jaggedrec.modules.hash_embedding_modules import HashEmbeddingBagCollection, HashTableOptions

    options = {f"t{t}": HashTableOptions(bucket_size=args.bucket_size, eviction="lru", unplaced="fallback")
               for t in range(w["tables"])}
    lookup = HashEmbeddingBagCollection(_configs(w), options, device=device, backend="torch")
    fused = optim.RowWiseAdagrad(lr=0.01)
    hashed = HashEmbeddingBagCollection(_configs(w), options, device=device, backend="torch", fused_optimizer=fused)
    static = jr.EmbeddingBagCollection(_configs(w), device=device, backend="torch", fused_optimizer=fused)

    def forward(module):
        def step(raw, _static):
            with torch.no_grad():
                out = module(raw)
                (out[0] if isinstance(out, tuple) else out).values()  # MC-EBC: (pooled, remapped KJT)
        return step

    def train(module, use_static: bool):
        def step(raw, static_kjt):
            module(static_kjt if use_static else raw).values().sum().backward()
        return step

    providers = {"jaggedrec_hash": ("lookup", forward(lookup))}
    if not args.skip_torchrec:
        for interval in (1, 10):
            module = _torchrec_mc(w, device, interval)
            if module is not None:
                providers[f"torchrec_mch[{interval}]"] = ("lookup", forward(module))
    providers["train_hash"] = ("train", train(hashed, False))
    providers["train_static"] = ("train", train(static, True))
    if args.same_rows:
        providers["train_static_same_rows"] = ("train", train(static, True))
    return providers


def _torchrec_mc(w, device: str, interval: int):
    try:
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
        from torchrec.modules.mc_modules import LRU_EvictionPolicy, MCHManagedCollisionModule, ManagedCollisionCollection
    except ImportError:
        return None
    configs = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=w["dim"], num_embeddings=w["num_embeddings"],
                                  feature_names=[f"f{t}"]) for t in range(w["tables"])]
    mcs = {c.name: MCHManagedCollisionModule(zch_size=c.num_embeddings, device=torch.device(device),
                                             eviction_policy=LRU_EvictionPolicy(), eviction_interval=interval)
           for c in configs}
    ebc = EmbeddingBagCollection(configs, device=torch.device(device))
    return ManagedCollisionEmbeddingBagCollection(ebc, ManagedCollisionCollection(mcs, configs))


def _as_torchrec(kjt):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths())


def _inputs(name: str, batches, tr_batches, same):
    """The ``(raw, static)`` KJT pairs provider ``name`` steps on."""
    if name.startswith("torchrec"):
        return tr_batches
    return same if name == "train_static_same_rows" else batches


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Parse, time, print; returns the JSON document."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    w = _workload(args)
    device = args.device
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        keys, batches = _batches(w, max(1, args.batches), args.seed, device)
        providers = _providers(w, args, device)
        tr_batches = [(_as_torchrec(raw), static) for raw, static in batches] if any(
            n.startswith("torchrec") for n in providers) else batches
        if args.same_rows:  # that provider's static KJT: the hashed tables' rows
            same = [(raw, rows) for (raw, _), rows in zip(batches, _same_rows(w, args, device, batches))]
        samples: Dict[str, List[float]] = {name: [] for name in providers}
        cpu: Dict[str, List[float]] = {name: [] for name in providers}
        ids = [int(raw.values().numel()) for raw, _ in batches]
        for name, (_, step) in providers.items():  # warm up: one pass over the batches
            for raw, static in _inputs(name, batches, tr_batches, same if args.same_rows else None):
                step(raw, static)
        for r in range(args.repeats):
            for b in range(len(batches)):
                for name, (_, step) in providers.items():  # alternate within the round
                    raw, static = _inputs(name, batches, tr_batches, same if args.same_rows else None)[b]
                    begin, begin_cpu = time.perf_counter(), time.thread_time()
                    step(raw, static)
                    cpu[name].append((time.thread_time() - begin_cpu) * 1e3)
                    samples[name].append((time.perf_counter() - begin) * 1e3)
            if not args.no_progress:
                print(f"round {r + 1}/{args.repeats}", file=sys.stderr)
    finally:
        torch.set_num_threads(before)
    mean_ids = sum(ids) / len(ids)
    results = {}
    for name, (kind, _) in providers.items():
        median = statistics.median(samples[name])
        results[name] = {"kind": kind, "median_ms": round(median, 4), "ids_per_s": round(mean_ids / median * 1e3),
                         "cpu_median_ms": round(statistics.median(cpu[name]), 4)}
    ratio = results["train_hash"]["median_ms"] / results["train_static"]["median_ms"]
    cpu_ratio = results["train_hash"]["cpu_median_ms"] / results["train_static"]["cpu_median_ms"]
    same_rows = {}
    if args.same_rows:
        base = results["train_static_same_rows"]
        hashed = results["train_hash"]
        same_rows = {"train_ratio_hash_over_static_same_rows": round(hashed["median_ms"] / base["median_ms"], 3),
                     "train_cpu_ratio_hash_over_static_same_rows":
                         round(hashed["cpu_median_ms"] / base["cpu_median_ms"], 3)}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc = {"module": "mc", "workload": w, "device": device, "threads": args.threads, "repeats": args.repeats,
           "batches": len(batches), "ids_per_batch": mean_ids, "load_avg": load, "results": results,
           "train_ratio_hash_over_static": round(ratio, 3),
           "train_cpu_ratio_hash_over_static": round(cpu_ratio, 3), **same_rows,
           "command": "jaggedrec-bench " + " ".join(argv or [])}
    print(f"mc: {w}, {mean_ids:.0f} ids a batch, load average {load}")
    print(f"{'provider':22} {'kind':7} {'median ms':>10} {'Mids/s':>8} {'CPU ms':>9}")
    for name, r in results.items():
        print(f"{name:22} {r['kind']:7} {r['median_ms']:10.3f} {r['ids_per_s'] / 1e6:8.3f} {r['cpu_median_ms']:9.3f}")
    print(f"train step, hashed / static: {ratio:.3f}x wall clock, {cpu_ratio:.3f}x thread CPU time")
    if same_rows:
        wall, cpu_time = same_rows.values()
        print(f"train step, hashed / static fed the same rows: {wall:.3f}x wall clock, {cpu_time:.3f}x thread CPU time")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0
