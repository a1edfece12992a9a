"""The tutorial's sharding section (examples/torchrec_intro_sharding.py) on one rank, as the
tutorial runs it, and under torchrun on two. Under torchrun each rank's output goes to a file
of its own (``--redirects 3``): through one shared pipe, two ranks' prints interleave, and under
load a print can reach the pipe in pieces."""

import os
import pathlib
import subprocess
import sys

from distributed_harness import free_port

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "torchrec_intro_sharding.py"


def _run(args, port, log_dir=None, timeout=240):
    env = dict(os.environ, MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    # under torchrun each rank's own stderr (where an abort's reason is) lies in the log dir
    ranks = "".join(f"\n== {path}\n{path.read_text()[-2000:]}"
                    for path in sorted(log_dir.glob("*/attempt_*/*/std*.log"))) if log_dir else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + ranks
    return done.stdout


def _check(printed: str, world: int, rank: int = 0) -> None:
    assert f"Distributed environment initialized: rank {rank} of {world}" in printed
    assert "Sharding Plan generated:" in printed
    for table in ("product_table", "user_table"):
        assert table in printed
    assert "['product', 'user']" in printed
    assert "torch.Size([2, 128])" in printed
    assert "product torch.Size([2, 64])" in printed and "user torch.Size([2, 64])" in printed
    assert "Sharded EBC with fused parameters fused optimizer: RowWiseAdagrad(lr=0.02, eps=0.002" in printed
    assert "SGD(lr=0.5)" in printed  # the in-backward optimizer, fused
    assert "Non Fused Model Parameters:\ndict_keys([])" in printed
    first = float(printed.split("First Iteration Loss: ")[1].split()[0])
    second = float(printed.split("Second Iteration Loss: ")[1].split()[0])
    assert second < first  # d loss / d row = -1: the fused Adagrad step raised the rows
    assert "Same rows as the unsharded module: True" in printed


def test_example_one_rank():
    _check(_run([sys.executable, str(EXAMPLE)], free_port()), 1)


def test_example_torchrun_two_ranks(tmp_path):
    port = free_port()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
          "--redirects", "3", "--log-dir", str(tmp_path), str(EXAMPLE)], port, tmp_path)
    for rank in (0, 1):  # <log dir>/<run>/attempt_0/<rank>/stdout.log
        (path,) = tmp_path.glob(f"*/attempt_*/{rank}/stdout.log")
        _check(path.read_text(), 2, rank)
