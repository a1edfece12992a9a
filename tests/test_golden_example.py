"""TorchRec's golden training example (``examples/golden_training/train_dlrm.py``, v1.8.0-rc1)
runs on jaggedrec: TorchRec's file, with ``torchrec`` replaced by ``jaggedrec`` in its imports
and nothing else, on 2 gloo ranks under torch's elastic launcher, calling its ``train()`` at
small sizes as TorchRec's own test does (``tests/torchrec_examples/run_golden.py``).

The file is read from a TorchRec checkout: $TORCHREC_CHECKOUT, or else the tag cloned from
GitHub; without either (no network) the test skips and says so. TorchRec itself is not needed.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "torchrec_examples"))
import run_golden  # noqa: E402


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    given = os.environ.get("TORCHREC_CHECKOUT")
    if given:
        return given
    target = tmp_path_factory.mktemp("torchrec") / "torchrec"
    try:
        subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", run_golden.TAG, run_golden.REPO_URL,
                        str(target)], check=True, timeout=120, capture_output=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no TorchRec checkout: set TORCHREC_CHECKOUT to a TorchRec {run_golden.TAG} tree "
                    f"(cloning {run_golden.REPO_URL} failed: {type(e).__name__})")
    return str(target)


def test_only_the_import_statements_are_rewritten():
    src = ("import torch\nfrom torchrec.models.dlrm import DLRM\nimport torchrec\n"
           "from torchrec.optim.keyed import (\n    KeyedOptimizerWrapper,\n)\n# torchrec in a comment\nx = 1\n")
    assert run_golden.rewrite_imports(src) == src.replace("from torchrec.", "from jaggedrec.").replace(
        "import torchrec\n", "import jaggedrec\n")
    with pytest.raises(ValueError, match="outside an import"):
        run_golden.rewrite_imports("from torchrec.x import y\nz = torchrec.w\n")
    with pytest.raises(ValueError, match="no `from torchrec`"):
        run_golden.rewrite_imports("import torch\n")


def test_golden_training_example_runs_on_two_gloo_ranks(checkout):
    pytest.importorskip("tqdm")  # the example's progress bar
    done = run_golden.run(checkout, nproc=2, timeout=240, num_embeddings=1000, embedding_dim=16, num_iterations=10)
    assert done.returncode == 0, done.stdout[-6000:]
    # both ranks finished all 10 iterations (the example's tqdm bar, one per rank)
    assert done.stdout.count("10/10") >= 2, done.stdout[-3000:]
