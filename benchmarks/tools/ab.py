"""Two checkouts of jaggedrec, timed against each other in one run: is a change faster or slower?

    git worktree add /tmp/jaggedrec-base <commit>
    python benchmarks/tools/ab.py --base /tmp/jaggedrec-base [--new .] [--mode forward|train]
        [--pooling-factor 1] [--bag-size fixed] [--dtype fp32] [--rounds 8]

Each round starts one process per checkout, in alternating order, with that checkout first on
``PYTHONPATH``. A process builds the module (26 tables of 100k rows, dim 64, batch 4096 by
default; the CPU torch path), warms up on three batches, then times ``--samples`` steps
rotating over them. The report gives each checkout's median over all its samples and the
median ratio of the rounds, so that a neighbour slowing the machine for a while slows both.
Only the CPU torch path is compared: it imports nothing outside ``jaggedrec/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from shape_args import add_shape_arguments

# Runs in the child, against whichever jaggedrec comes first on its path.
_CHILD = r"""
import json, sys, time
import torch
import jaggedrec as jr
from jaggedrec import optim
a = json.loads(sys.argv[1])
gen = torch.Generator().manual_seed(0)
dtype = {"fp32": jr.DataType.FP32, "fp16": jr.DataType.FP16, "bf16": jr.DataType.BF16}[a["dtype"]]
keys = [f"f{t}" for t in range(a["tables"])]
configs = [jr.EmbeddingBagConfig(name=f"t{t}", embedding_dim=a["dim"], num_embeddings=a["rows"],
                                 feature_names=[k], data_type=dtype) for t, k in enumerate(keys)]
fused = optim.SGD(lr=0.01) if a["mode"] == "train" else None
torch.manual_seed(0)
ebc = jr.EmbeddingBagCollection(configs, fused_optimizer=fused)
batches = []
for _ in range(3):
    if a["bag_size"] == "fixed":
        lengths = torch.full((a["tables"] * a["batch"],), int(a["pooling_factor"]))
    else:
        lengths = torch.randint(0, 2 * int(a["pooling_factor"]) + 1, (a["tables"] * a["batch"],), generator=gen)
    values = torch.randint(0, a["rows"], (int(lengths.sum()),), generator=gen)
    batches.append((values, lengths, torch.randn(a["batch"], a["tables"] * a["dim"], generator=gen)))
def step(i):
    values, lengths, grad = batches[i % 3]
    kjt = jr.KeyedJaggedTensor(keys, values, lengths=lengths)
    if a["mode"] == "forward":
        with torch.no_grad():
            ebc(kjt)
    else:
        ebc(kjt).values().backward(grad)
for i in range(3):
    step(i)
samples = []
for i in range(a["samples"]):
    start = time.perf_counter()
    step(i)
    samples.append(time.perf_counter() - start)
print(json.dumps(samples))
"""


def _run(tree: str, args: dict) -> list:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="checkout to compare against")
    parser.add_argument("--new", default=".", help="checkout under test (default: this one)")
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    add_shape_arguments(parser, pooling_factor=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args(argv)
    child = dict(mode=args.mode, tables=args.tables, rows=args.rows, dim=args.dim, batch=args.batch_size,
                 pooling_factor=args.pooling_factor, bag_size=args.bag_size, dtype=args.dtype, samples=args.samples)
    samples = {"base": [], "new": []}
    ratios = []
    for r in range(args.rounds):
        order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
        medians = {}
        for which in order:
            got = _run(args.base if which == "base" else args.new, child)
            samples[which] += got
            medians[which] = statistics.median(got)
        ratios.append(medians["new"] / medians["base"])
    base, new = (statistics.median(samples[k]) * 1e3 for k in ("base", "new"))
    print(f"{args.mode}, {args.tables} x {args.rows:,} rows, dim {args.dim}, {args.dtype}, batch {args.batch_size}, "
          f"{args.pooling_factor} ids/bag ({args.bag_size}); {args.rounds} rounds x {args.samples} samples")
    print(f"base {base:.2f} ms, new {new:.2f} ms; new/base per round: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
