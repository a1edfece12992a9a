"""The flags the single-purpose scripts beside this one (cpu_floor, forward_breakdown, ab)
share for one dlrm-like shape."""

from __future__ import annotations

from jaggedrec.benchmarks.workload import DTYPES


def add_shape_arguments(parser, pooling_factor: float, bags_and_dtype: bool = True) -> None:
    """``--tables --rows --dim --batch-size --pooling-factor``, and with ``bags_and_dtype``
    also ``--bag-size --dtype``, on ``parser``."""
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--pooling-factor", type=type(pooling_factor), default=pooling_factor)
    if bags_and_dtype:
        parser.add_argument("--bag-size", choices=("fixed", "random"), default="fixed")
        parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
