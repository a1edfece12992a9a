"""The ``jaggedrec-bench`` command line, installed as ``jaggedrec.benchmarks``."""
