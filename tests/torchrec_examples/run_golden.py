"""Runs TorchRec's golden training example (``examples/golden_training/train_dlrm.py``) on
jaggedrec: the file as TorchRec ships it, with ``torchrec`` replaced by ``jaggedrec`` in its
import statements and nothing else, on gloo ranks started by torch's elastic launcher
(``torchrun``), at small sizes, calling its ``train(...)`` as TorchRec's own test of it does.

Usage::

    python tests/torchrec_examples/run_golden.py [TORCHREC_CHECKOUT] [--nproc 2]
        [--num-embeddings 1000] [--embedding-dim 16] [--num-iterations 10] [--timeout 600]

``TORCHREC_CHECKOUT`` is a TorchRec source tree at tag v1.8.0-rc1 (a clone or a ``git
archive``; the ``TORCHREC_CHECKOUT`` environment variable works too); without either, the tag
is cloned from GitHub into a temporary folder. TorchRec's file is read from there and copied
into a temporary folder, never into this repository. Exits non-zero when a rank fails; the
ranks' output is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

TAG = "v1.8.0-rc1"
EXAMPLE = os.path.join("examples", "golden_training", "train_dlrm.py")
REPO_URL = "https://github.com/meta-pytorch/torchrec"

# the runner each rank executes: the example module's train(), as TorchRec's test calls it
_DRIVER = """\
import json, sys
sys.path.insert(0, {folder!r})
from train_dlrm import train
train(**json.loads({kwargs!r}))
"""

_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)torchrec(?=[.\s])")


def rewrite_imports(source: str) -> str:
    """``source`` with ``torchrec`` replaced by ``jaggedrec`` at the head of each ``from``/
    ``import`` statement, and only there: every other line stays as it is (checked)."""
    out = [_IMPORT.sub(r"\1\2\3jaggedrec", line) for line in source.splitlines(keepends=True)]
    changed = [new for old, new in zip(source.splitlines(True), out) if old != new]
    if not changed:
        raise ValueError("no `from torchrec` / `import torchrec` statement found: is this TorchRec's example?")
    leftover = [line for line in out if re.search(r"\btorchrec\b", line) and not line.lstrip().startswith("#")]
    if leftover:
        raise ValueError(f"torchrec named outside an import statement: {leftover}")
    return "".join(out)


def find_checkout(given: str | None, work: str) -> str:
    """The TorchRec checkout: ``given``, else $TORCHREC_CHECKOUT, else a fresh clone of the tag."""
    given = given or os.environ.get("TORCHREC_CHECKOUT")
    if given:
        if not os.path.isfile(os.path.join(given, EXAMPLE)):
            raise FileNotFoundError(f"{given} has no {EXAMPLE}: not a TorchRec checkout at {TAG}")
        return given
    target = os.path.join(work, "torchrec")
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", TAG, REPO_URL, target], check=True,
                   timeout=300)
    return target


def prepare(checkout: str, folder: str, **train_kwargs) -> str:
    """Copy the rewritten example and a driver into ``folder``; returns the driver's path."""
    with open(os.path.join(checkout, EXAMPLE)) as f:
        source = f.read()
    with open(os.path.join(folder, "train_dlrm.py"), "w") as f:
        f.write(rewrite_imports(source))
    import json

    driver = os.path.join(folder, "driver.py")
    with open(driver, "w") as f:
        f.write(_DRIVER.format(folder=folder, kwargs=json.dumps(train_kwargs)))
    return driver


def run(checkout: str | None = None, nproc: int = 2, timeout: float = 600, **train_kwargs) -> subprocess.CompletedProcess:
    """Launch the example on ``nproc`` gloo ranks; returns the finished launcher process
    (its ``returncode`` and its ranks' combined ``stdout``)."""
    with tempfile.TemporaryDirectory() as work:
        checkout = find_checkout(checkout, work)
        driver = prepare(checkout, work, **train_kwargs)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = env.get("JAGGEDREC_GOLDEN_CUDA", "")  # gloo, as on a CPU machine
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", "--monitor-interval=1", driver]
        return subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", nargs="?")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--num-embeddings", type=int, default=1000)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--num-iterations", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600)
    a = p.parse_args(argv)
    done = run(a.checkout, nproc=a.nproc, timeout=a.timeout, num_embeddings=a.num_embeddings,
               embedding_dim=a.embedding_dim, num_iterations=a.num_iterations)
    print(done.stdout)
    print(f"golden example on {a.nproc} ranks: {'passed' if done.returncode == 0 else 'FAILED'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
