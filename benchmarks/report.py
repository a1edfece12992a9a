"""What a run leaves behind: an aligned table on stdout, JSON, CSV and a PNG plot.

JSON layout::

    {"machine": {...}, "copy_bandwidth_gbps": x, "preset": ..., "command": [...],
     "runs": [{"config": {Workload fields}, "label": ..., "bytes_per_step": ...,
               "providers": {name: {"status", "reason", "note", "median_ms", "p20_ms", "p80_ms",
                                    "gbps", "pct_of_copy_bw", "speedup_vs_loop", "peak_mem_mb",
                                    "table_bytes", "state_mb", "step_mem_mb", "max_abs_err", "samples_ms"}}}]}

``speedup_vs_loop`` is over the run's baseline: ``eb_loop``, ``embedding_loop`` with
``--module ec``, ``jaggedrec_fp32`` with ``--dtype int8|int4``.

``jaggedrec-bench --module ec`` writes the same layout with ``"module": "ec"`` after
``"command"`` (the bag collection's documents have no ``"module"`` key).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from typing import Dict, List, Optional, Sequence

import torch

from .runner import ProviderResult, WorkloadResult

_COLUMNS = ("provider", "status", "median ms", "p20-p80 ms", "GB/s", "% copy BW", "vs loop", "table MB", "peak MB")


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> Dict[str, object]:
    """Where and with what the numbers were taken. Versions come from package metadata, so
    nothing heavy is imported here."""
    cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other processes' load when the run started: on a shared machine it explains noise
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "jaggedrec": _version("jaggedrec"),
        "jaggedrec_commit": _git_commit(),
        "torchrec": _version("torchrec"),
        "fbgemm_gpu": _version("fbgemm-gpu") or _version("fbgemm-gpu-cpu") or _version("fbgemm_gpu_nightly"),
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _row(name: str, r: ProviderResult) -> List[str]:
    if r.status != "ok":
        status = "WRONG" if r.status == "wrong" else "skipped"
        return [name, status] + ["-"] * (len(_COLUMNS) - 2)
    spread = f"{r.p20_ms:.3f}-{r.p80_ms:.3f}" if r.p20_ms is not None else "-"
    table_mb = None if r.table_bytes is None else r.table_bytes / 2**20
    return [name, "ok", _fmt(r.median_ms, ".3f"), spread, _fmt(r.gbps, ".2f"), _fmt(r.pct_of_copy_bw, ".1f", "%"),
            _fmt(r.speedup_vs_loop, ".2f", "x"), _fmt(table_mb, ".1f"), _fmt(r.peak_mem_mb, ".0f")]


def aligned_rows(rows: Sequence[Sequence[str]]) -> List[str]:
    """A header row and its body as aligned lines: the first two columns (provider, status)
    left-aligned, numbers right-aligned, a rule of dashes under the header."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[c]) if c < 2 else cell.rjust(widths[c])
                               for c, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_table(run: WorkloadResult, title: str = "", ratio: str = "vs loop") -> str:
    """An aligned table for one configuration, then one line per provider not timed and per note;
    ``ratio`` heads the column of the baseline's median over each provider's."""
    header = [ratio if c == "vs loop" else c for c in _COLUMNS]
    lines = [title or run.workload.describe()] + aligned_rows([header] + [_row(n, r) for n, r in run.providers.items()])
    for name, r in run.providers.items():
        if r.status == "wrong":
            lines.append(f"  WRONG {name}: {r.reason} (not timed)")
        elif r.note:
            lines.append(f"  note {name}: {r.note}")
    return "\n".join(lines)


# A p20-p80 spread wider than this share of the median: the machine moved the samples more than
# the code did (a neighbour holding a core, two OpenMP threads on two busy cores), and neither
# the median nor a ratio to it can be trusted to hold in another run.
WIDE_SPREAD = 0.5


def spread_warnings(run: WorkloadResult, limit: float = WIDE_SPREAD) -> List[str]:
    """One line per timed provider whose p20-p80 spread is wider than ``limit`` x its median."""
    lines = []
    for name, r in run.providers.items():
        if r.status == "ok" and r.median_ms and r.p80_ms - r.p20_ms > limit * r.median_ms:
            lines.append(f"  warning {name}: p20-p80 {r.p20_ms:.3g}-{r.p80_ms:.3g} ms around a median of "
                         f"{r.median_ms:.3g} ms, too wide for its median or ratios to hold; other work on the "
                         f"machine is likely in the way (try --threads 1, more --repeats, a quieter machine)")
    return lines


def skipped_summary(runs: Sequence[WorkloadResult]) -> str:
    """Each skipped provider once, with its reason(s)."""
    reasons: Dict[str, List[str]] = {}
    for run in runs:
        for name, r in run.providers.items():
            if r.status == "skipped" and r.reason not in reasons.setdefault(name, []):
                reasons[name].append(r.reason)
    lines = [f"  {name}: {'; '.join(rs)}" for name, rs in reasons.items() if rs]
    return "skipped:\n" + "\n".join(lines) if lines else ""


def to_json(runs: Sequence[WorkloadResult], machine: Dict[str, object], copy_gbps: Optional[float],
            preset: Optional[str], command: Sequence[str], module: Optional[str] = None) -> Dict[str, object]:
    document: Dict[str, object] = {
        "machine": machine,
        "copy_bandwidth_gbps": copy_gbps,
        "preset": preset,
        "command": list(command),
    }
    if module is not None:
        document["module"] = module
    document["runs"] = [{"config": run.workload.as_dict(), "label": run.workload.describe(),
                         "bytes_per_step": run.bytes_per_step,
                         "providers": {n: dataclasses.asdict(r) for n, r in run.providers.items()}}
                        for run in runs]
    return document


def write_json(path: str, document: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


_CSV_RESULT_FIELDS = ("status", "reason", "note", "median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy_bw",
                      "speedup_vs_loop", "peak_mem_mb")
# the run's device is the configuration's ``device`` column already
_CSV_MACHINE_FIELDS = ("date", "gpu", "cpu", "torch_threads", "torch", "triton", "jaggedrec", "jaggedrec_commit")


def write_csv(path: str, document: Dict[str, object]) -> None:
    """One row per (configuration, provider); appends when the file exists with the same header.
    A ``--module ec`` document's rows start with a ``module`` column, so they never append to a
    bag collection's file."""
    config_fields = list(document["runs"][0]["config"]) if document["runs"] else []
    module = [document["module"]] if "module" in document else []
    header = (["module"] * len(module) + ["preset"] + config_fields + ["provider"] + list(_CSV_RESULT_FIELDS)
              + ["copy_bandwidth_gbps"] + list(_CSV_MACHINE_FIELDS))
    append = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            append = next(csv.reader(f), None) == header
    machine = document["machine"]
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.writer(f)
        if not append:
            writer.writerow(header)
        for run in document["runs"]:
            config = [" ".join(map(str, v)) if isinstance(v, list) else v for v in run["config"].values()]
            for name, r in run["providers"].items():
                writer.writerow(module + [document["preset"]] + config + [name] + [r[k] for k in _CSV_RESULT_FIELDS]
                                + [document["copy_bandwidth_gbps"]] + [machine.get(k) for k in _CSV_MACHINE_FIELDS])


def _swept_field(runs: Sequence[WorkloadResult]) -> Optional[str]:
    """The one Workload field that varies across runs, if exactly one does."""
    fields = [f.name for f in dataclasses.fields(runs[0].workload)]
    varying = [f for f in fields if len({repr(getattr(r.workload, f)) for r in runs}) > 1]
    return varying[0] if len(varying) == 1 else None


def write_plot(path: str, runs: Sequence[WorkloadResult], title: str) -> Optional[str]:
    """Median ms (with p20-p80 bars) and GB/s per provider: against the swept field for a sweep,
    as bars for one configuration. Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'jaggedrec[bench]'), so no plot was written"
    names = [n for n in runs[0].providers if any(r.providers.get(n) and r.providers[n].status == "ok" for r in runs)]
    fig, (ax_ms, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    field = _swept_field(runs) if len(runs) > 1 else None
    xs = [getattr(r.workload, field) for r in runs] if field else list(range(len(runs)))
    for k, name in enumerate(names):
        got = [(x, r.providers[name]) for x, r in zip(xs, runs) if r.providers[name].status == "ok"]
        if len(runs) == 1:
            r = got[0][1]
            ax_ms.bar(k, r.median_ms, yerr=[[r.median_ms - r.p20_ms], [r.p80_ms - r.median_ms]], capsize=3)
            ax_bw.bar(k, r.gbps)
            continue
        med = [r.median_ms for _, r in got]
        err = [[r.median_ms - r.p20_ms for _, r in got], [r.p80_ms - r.median_ms for _, r in got]]
        ax_ms.errorbar([x for x, _ in got], med, yerr=err, marker="o", capsize=3, label=name)
        ax_bw.plot([x for x, _ in got], [r.gbps for _, r in got], marker="o", label=name)
    if len(runs) == 1:
        for ax in (ax_ms, ax_bw):
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    else:
        for ax in (ax_ms, ax_bw):
            ax.set_xlabel(field or "configuration")
            if field in ("tables", "num_embeddings", "batch_size"):
                ax.set_xscale("log")
        ax_ms.set_yscale("log")
        ax_ms.legend(fontsize=8)
    ax_ms.set_ylabel("median ms per step (p20-p80 bars)")
    ax_bw.set_ylabel("GB/s (FBGEMM's byte count)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
