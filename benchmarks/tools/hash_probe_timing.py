"""Time the hash tables' probe-and-gather kernel against the static gather, on the same inputs.

    python benchmarks/tools/hash_probe_timing.py --output hash_probe.json        # CUDA, the dlrm shape
    python benchmarks/tools/hash_probe_timing.py --device cpu --features 2 --batch-size 8 --rows 64   # a dry run

One batch of ``features`` features x ``batch_size`` bags of ``ids_per_bag`` ids, one hashed
table per feature (buckets of ``bucket_size`` slots, fp32 rows) holding every id of the batch,
pooled three ways on the same ids and rows:

* ``probe``: ``kernels/hash_probe.py``'s kernel on the raw ids (hash, bucket keys, row), as the
  hashed collection launches it (``ops.hash_probe.probe_pooled_triton``);
* ``probe_static``: the same kernel with every table marked static (row = id), on the rows the
  probe finds: its gather alone, without the hash and the bucket read;
* ``pooled``: the library's pooled forward (``jaggedrec::embedding_bags``, the short-bag kernel
  at one id per bag) on those rows: what a static table costs.

Each is checked to give the probe's output (float tolerance), then timed with CUDA events
(median of ``--repeats`` after warm-up), alternating the three. Under ``--device cpu`` the
kernels run in Triton's interpreter: a check that the script works, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch


def _tables(features: int, rows: int, bucket_size: int, ids: torch.Tensor, dim: int, device):
    """Keys holding each feature's distinct ids in their buckets, the weights, and the meta."""
    from jaggedrec.ops import hash_probe_torch as hp
    num_buckets = rows // bucket_size
    slots = num_buckets * bucket_size
    keys = torch.full((features * slots + 1,), hp.EMPTY, dtype=torch.int64)
    meta = torch.zeros(features, 9, dtype=torch.int64)
    for f in range(features):
        distinct = torch.unique(ids[f])
        bucket = hp.bucket_of(hp.mix(distinct), torch.tensor(f * num_buckets), torch.tensor(num_buckets))
        order = torch.argsort(bucket, stable=True)
        bucket, distinct = bucket[order], distinct[order]
        first = torch.searchsorted(bucket, bucket, right=False)
        rank = torch.arange(bucket.numel()) - first
        kept = rank < bucket_size  # the rest miss and read the fallback row, as a full bucket would
        keys[bucket[kept] * bucket_size + rank[kept]] = distinct[kept]
        # weight offset, dim, out column, mean, hashed, bucket base, buckets, slot base, fallback row
        meta[f] = torch.tensor([f * (slots + 1) * dim, dim, f * dim, 0, 1, f * num_buckets, num_buckets, f * slots,
                                slots])
    torch.manual_seed(1)
    weights = torch.randn(features * (slots + 1) * dim, device=device)  # made on the device: 6.6 GB at the dlrm shape
    return keys.to(device), weights, meta.to(device)


def _median_ms(fn, repeats: int, device) -> float:
    if device.type != "cuda":
        return float("nan")
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(args) -> dict:
    import jaggedrec as jr
    from jaggedrec.ops import hash_probe as probe_ops

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    k, b, n, dim = args.features, args.batch_size, args.ids_per_bag, args.dim
    raw = torch.randint(0, 2 ** 40, (k, b * n), generator=gen)  # raw ids from a wide space, as hashed features get
    keys, weights, meta = _tables(k, args.rows, args.bucket_size, raw, dim, device)
    values = raw.reshape(-1).to(device)
    offsets = torch.arange(0, k * b * n + 1, n, dtype=torch.int64, device=device)

    # the alignment the collection promises (ops.hash_probe.probe_alignment): offsets and columns are multiples of dim
    align = 4 if dim % 4 == 0 else 1

    def probe():
        return probe_ops.probe_pooled_triton(keys, args.bucket_size, weights, values, offsets, meta, b, k * dim, dim,
                                             align)

    # the rows the probe finds, from the keys (the torch path's lookup), for the two static gathers
    from jaggedrec.ops import hash_probe_torch as hp
    buckets = hp.bucket_of(hp.mix(values), meta[:, 5].repeat_interleave(b * n), meta[:, 6].repeat_interleave(b * n))
    slot = hp.lookup(keys, args.bucket_size, values, buckets, torch.ones_like(values, dtype=torch.bool))
    slot_base = meta[:, 7].repeat_interleave(b * n)
    rows = torch.where(slot >= 0, slot - slot_base, meta[:, 8].repeat_interleave(b * n))
    static_meta = meta.clone()
    static_meta[:, 4] = 0

    def probe_static():
        return probe_ops.probe_pooled_triton(keys, args.bucket_size, weights, rows, offsets, static_meta, b, k * dim,
                                             dim, align)

    slots = args.rows // args.bucket_size * args.bucket_size + 1
    configs = [jr.EmbeddingBagConfig(name=f"t{f}", embedding_dim=dim, num_embeddings=slots,
                                     feature_names=[f"f{f}"]) for f in range(k)]
    ebc = jr.EmbeddingBagCollection(configs, device=device)
    with torch.no_grad():
        for f in range(k):
            ebc.embedding_bags[f"t{f}"].weight.copy_(weights[f * slots * dim:(f + 1) * slots * dim].view(slots, dim))
    kjt = jr.KeyedJaggedTensor([f"f{f}" for f in range(k)], rows, lengths=torch.full((k * b,), n, device=device))

    def pooled():
        with torch.no_grad():
            return ebc(kjt).values()

    expected = probe()[0]
    for name, fn in (("probe_static", lambda: probe_static()[0]), ("pooled", pooled)):
        torch.testing.assert_close(fn(), expected, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    runs = {"probe": probe, "probe_static": probe_static, "pooled": pooled}
    for fn in runs.values():  # warm-up: builds, autotuning
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):  # alternated, so that a drift in clocks hits all three alike
        for name, fn in runs.items():
            times[name].append(_median_ms(fn, args.repeats, device))
    result = {"config": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "median_ms": {name: statistics.median(t) for name, t in times.items()}, "rounds_ms": times,
              "bytes_read": {"rows": k * b * n * dim * 4, "bucket_keys": k * b * n * args.bucket_size * 8,
                             "ids": k * b * n * 8, "output": k * b * dim * 4}}
    ms = result["median_ms"]
    if device.type == "cuda":
        result["probe_over_pooled"] = ms["probe"] / ms["pooled"]
        result["probe_over_probe_static"] = ms["probe"] / ms["probe_static"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--ids-per-bag", type=int, default=1)
    parser.add_argument("--rows", type=int, default=500_000, help="rows per table (slots; the last one the fallback)")
    parser.add_argument("--bucket-size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds_ms"}, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
