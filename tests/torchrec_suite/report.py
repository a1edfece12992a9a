"""Counts for ``run.sh``: which of TorchRec's tests pass on real TorchRec and on jaggedrec.

Usage: ``python report.py torchrec.xml jaggedrec.xml`` (pytest's JUnit XML of each run).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from typing import Dict, Tuple


def outcomes(path: str) -> Dict[str, Tuple[str, str, bool]]:
    """test id -> (outcome, first line of the error, is a TorchScript test)."""
    out = {}
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        torchscript = any(p.get("name") == "torchscript" for p in case.iter("property"))
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "").strip().splitlines()[0][:160] if node.get("message") else ""
                break
        out[name] = (outcome, message, torchscript)
    return out


def main(real_path: str, ours_path: str) -> int:
    real, ours = outcomes(real_path), outcomes(ours_path)
    passing = sorted(t for t, (o, _, _) in real.items() if o == "passed")
    counted = [t for t in passing if not real[t][2]]
    torchscript = [t for t in passing if real[t][2]]
    failures = [t for t in counted if ours.get(t, ("missing", "", False))[0] != "passed"]
    print(f"tests collected: {len(real)}; pass on torchrec: {len(passing)} "
          f"({len(torchscript)} of them TorchScript, left out)")
    print(f"pass on jaggedrec: {len(counted) - len(failures)} of the {len(counted)} non-TorchScript tests "
          f"that pass on torchrec")
    ts_ours = sum(ours.get(t, ("missing",))[0] == "passed" for t in torchscript)
    print(f"TorchScript tests passing on jaggedrec anyway: {ts_ours} of {len(torchscript)}")
    if failures:
        print("failures on jaggedrec:")
        for t in failures:
            outcome, message, _ = ours.get(t, ("missing", "not collected", False))
            print(f"  {t}: {outcome}: {message}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
