"""What every benchmark keeps beside its figures, so that a figure can be compared later: the
machine, the commit and the config. A figure without them cannot be told from noise.

Each run appends one JSON line to ``benchmarks/results/<name>.jsonl`` (not committed: one per
machine). Where ``benchmarks/baselines/<name>.json`` exists (committed: a run someone chose to
compare against), the run prints each figure's ratio to it. To keep a run as the baseline:

    python -m benchmarks.harness keep NAME     # the last line of results/NAME.jsonl

Independent of ``deepscaler``: it reads only the machine and git.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BASELINES = HERE / "baselines"


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """Platform, Python, CPUs and the GPUs' names (nvidia-smi's; none without an NVIDIA driver)."""
    gpus = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpus": gpus.splitlines() if gpus else []}


def commit() -> str | None:
    """HEAD, with ``-dirty`` when the tree has uncommitted changes (the figure is not HEAD's)."""
    head = _run(["git", "rev-parse", "HEAD"])
    if head is None:
        return None
    return head + ("-dirty" if _run(["git", "status", "--porcelain", "--untracked-files=no"]) else "")


def ratios(figures: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """now / baseline for every number both have (a ratio above 1: more of it than the baseline)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return {k: round(v / baseline[k], 3) for k, v in figures.items()
            if number(v) and number(baseline.get(k)) and baseline[k] != 0}


def record(name: str, config: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """Append the run to results/NAME.jsonl and compare it with baselines/NAME.json; returns the
    line. Prints to stderr, so a benchmark's last stdout line stays its own JSON."""
    line = {"benchmark": name, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "machine": machine(), "config": json.loads(json.dumps(config, default=str)),
            "figures": figures}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.jsonl"
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    print(f"# {name}: recorded in {out.relative_to(HERE.parent)} (commit {line['commit']})", file=sys.stderr)
    path = BASELINES / f"{name}.json"
    if not path.is_file():
        print(f"# {name}: no baseline ({path.relative_to(HERE.parent)}; python -m benchmarks.harness keep {name})",
              file=sys.stderr)
        return line
    base = json.loads(path.read_text(encoding="utf-8"))
    line["vs_baseline"] = ratios(figures, base["figures"])
    differs = [what for what in ("config", "machine") if base.get(what) != line[what]]
    print(f"# {name}: now / baseline (commit {base.get('commit')}"
          f"{'; not the same ' + ' nor '.join(differs) if differs else ''}): "
          + ", ".join(f"{k} x{r}" for k, r in line["vs_baseline"].items()), file=sys.stderr)
    return line


def keep(name: str) -> Path:
    """Make the last recorded run of NAME its baseline."""
    lines = (RESULTS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    BASELINES.mkdir(exist_ok=True)
    path = BASELINES / f"{name}.json"
    path.write_text(json.dumps(json.loads(lines[-1]), indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("keep", help="make the last run of a benchmark its baseline").add_argument("name")
    args = ap.parse_args(argv)
    try:
        print(f"baseline: {keep(args.name).relative_to(HERE.parent)}")
    except (FileNotFoundError, IndexError):
        print(f"error: no recorded run of {args.name} in {RESULTS.relative_to(HERE.parent)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
