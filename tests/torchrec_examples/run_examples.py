"""Runs TorchRec's CPU-runnable examples on jaggedrec: the files as TorchRec ships them at tag
v1.8.0-rc1, with ``torchrec`` replaced by ``jaggedrec`` at the head of their import statements
(and their ``torchrec.github.examples`` package path pointed at the temporary copy), nothing else.

* ``examples/prediction``: its test (``test_predict_using_torchrec.py``);
* ``examples/bert4rec/models``: its test (``test_bert4rec.py``). The model calls FBGEMM's op
  ``torch.ops.fbgemm.jagged_2d_to_dense`` itself, not through TorchRec's API, so it needs
  ``fbgemm_gpu`` imported, which ``import torchrec`` does for TorchRec users; the run imports it
  when it is installed and says so;
* ``examples/zch/main.py``: the managed-collision benchmark, with and without ``--use_mpzch``.

The two-tower retrieval example needs faiss, and the training scripts need GPUs or datasets;
they are left out. Usage::

    python tests/torchrec_examples/run_examples.py [TORCHREC_CHECKOUT] [--timeout 600]

(the checkout as for ``run_golden.py``). Exits non-zero when an example fails; prints each
one's output tail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from run_golden import _IMPORT, find_checkout

EXAMPLES = ("prediction", "bert4rec", "zch")
PACKAGE = "ex"  # the copy's package name, for torchrec.github.examples
_FBGEMM = "try:\n    import fbgemm_gpu  # noqa: F401  (bert4rec calls torch.ops.fbgemm directly)\nexcept ImportError:\n    pass\n"


def copy_examples(checkout: str, folder: str) -> None:
    """``examples/{EXAMPLES}`` of ``checkout`` into ``folder/ex``, import lines rewritten."""
    root = os.path.join(folder, PACKAGE)
    for name in EXAMPLES:
        shutil.copytree(os.path.join(checkout, "examples", name), os.path.join(root, name))
    for d, _, files in os.walk(root):
        if "__init__.py" not in files:
            open(os.path.join(d, "__init__.py"), "w").close()
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                with open(path) as src:
                    lines = src.read().replace("torchrec.github.examples.", f"{PACKAGE}.").splitlines(True)
                with open(path, "w") as out:
                    out.write("".join(_IMPORT.sub(r"\1\2\3jaggedrec", line) for line in lines))
    with open(os.path.join(folder, "conftest.py"), "w") as f:
        f.write(_FBGEMM)


def runs(folder: str):
    """(name, command) of each example run, from ``folder``."""
    py = sys.executable
    yield "prediction test", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              f"{PACKAGE}/prediction/test_predict_using_torchrec.py"]
    yield "bert4rec model test", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  f"{PACKAGE}/bert4rec/models/tests/test_bert4rec.py"]
    for flag in ([], ["--use_mpzch"]):
        yield f"zch main {' '.join(flag)}".strip(), [py, "-m", f"{PACKAGE}.zch.main", *flag, "--num_iters", "20"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", nargs="?")
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args(argv)
    failed = 0
    with tempfile.TemporaryDirectory() as work:
        copy_examples(find_checkout(a.checkout, work), work)
        env = dict(os.environ, PYTHONPATH=work + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for name, cmd in runs(work):
            done = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=a.timeout)
            failed += done.returncode != 0
            print(f"== {name}: {'passed' if done.returncode == 0 else 'FAILED'}")
            print("\n".join(done.stdout.splitlines()[-6:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
