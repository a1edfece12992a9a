"""codegen_report.py on the kernel before the pipeline: ``python report_before.py BEFORE.py [report args]``
runs the report with ``jaggedrec.kernels.hash_probe``'s kernel replaced by BEFORE.py's (the launch
glue's new DIM_ALIGN and WINDOW arguments are not its parameters, so they are dropped), and
the estimate without the pipeline's two extra iterations (that kernel has none)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import codegen_report  # noqa: E402  (sets TRITON_INTERPRET=0)
import estimate  # noqa: E402

from jaggedrec.kernels import hash_probe  # noqa: E402

exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), vars(hash_probe))
estimate.PIPELINE_FILL = {}
sys.exit(codegen_report.main(sys.argv[2:]))
