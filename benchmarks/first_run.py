"""The README's main command as a newcomer runs it: how long it takes and whether it learns.

    .venv/bin/python -m benchmarks.first_run [--dir DIR] [key=value ...]

Runs ``python -m deepscaler.submit --stage 1 --preset tiny --executor local`` in an empty
folder (a fresh ``outputs/``, so the warm start is included: nothing is cached yet), and prints
the wall time, the reward per step and the means of the first and last 3 steps. The target
(issue 14): the last 3 at least 0.2 above the first 3, in at most 180 s on 2 CPU cores. The
suite checks the reward (tests/integration/test_quickstart.py), not the time. The last line is
one JSON object: {"wall_s", "warm_start_s", "reward_first3", "reward_last3", "gain", "rewards",
"load_before", "load_after", "passed"}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._toy import REPO, load_average
from benchmarks.harness import record
from deepscaler.progress import step_rows
from deepscaler.store import RunStore


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="an empty work folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, to try other settings")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="first_run-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    argv = [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny", "--executor", "local", *args.overrides]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.monotonic() - started
    print(done.stdout[-4000:], done.stderr[-2000:] if done.returncode else "", sep="\n")
    if done.returncode:
        return done.returncode
    store = RunStore(work / "outputs", "tiny", 1)
    rewards = [r["reward_mean"] for r in step_rows(store.read_metrics().records) if "reward_mean" in r]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    warm = re.findall(r"warm start \d+/\d+: loss \S+ \((\d+) s\)", done.stdout)  # the last is the total
    result = {"wall_s": round(wall, 1), "warm_start_s": int(warm[-1]) if warm else None,
              "reward_first3": round(first, 4), "reward_last3": round(last, 4), "gain": round(last - first, 4),
              "rewards": [round(r, 4) for r in rewards], "load_before": load_before, "load_after": load_average(),
              "passed": bool(last - first >= 0.2 and wall <= 180)}
    print(f"wall {wall:.0f} s; reward {first:.3f} (first 3) -> {last:.3f} (last 3), gain {last - first:+.3f}")
    record("first_run", vars(args), result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
