"""The estimate table's backward rows, with the whole backward (the fused kernel plus the index
work, estimate.GLUE_BYTES_PER_CONTRIBUTION), from the morning reports' fused-kernel readings.
Run from the repository root: python benchmarks/results/codegen-sm90a-2026-12-06-short-quant/backward_whole.py"""
import json
import os
import sys
from types import SimpleNamespace

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tools"))
import estimate  # noqa: E402

for tri in ("triton39", "triton36"):
    path = os.path.join(ROOT, "benchmarks", "results", f"codegen-sm90a-2026-12-06-{tri}", "fp32-dim128-int64.json")
    fused = [SimpleNamespace(**r) for r in json.load(open(path)) if r["kernel"] == "fused"]
    print(f"# {tri}: % of copy (FBGEMM's formula over the kernel's time; over the whole backward's), % of peak")
    print("# columns: H100 900ns L=1, L=20, H100 1200ns L=1, L=20, H200 900ns L=1, L=20, H200 1200ns L=1, L=20")
    for row in estimate.rows(fused, "fp32", 128):
        print(" | ".join(row))
