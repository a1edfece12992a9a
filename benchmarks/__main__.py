"""``python -m jaggedrec.benchmarks``: the same as the ``jaggedrec-bench`` console script."""

import sys

from .cli import main

sys.exit(main())
