"""Fault injection on the tiny loop: how often does a killed stage recover exactly?

    python benchmarks/faults.py [--trials 20] [--steps 6] [--seed 0] [--dir DIR]

Each trial starts a deterministic tiny stage (``--executor local``), SIGKILLs one of its
processes (trainer, orchestrator or the inference server, chosen by the seed) at a seeded
random moment 0-12 s after the first rollouts, then resumes it with ``--resume-step latest``
(up to three times) and compares the final weights with one uninterrupted run. The harness is
``tests/helpers/chaos.py``, the same as the fault tests.

Prints one row per trial and ends with one JSON line:
    {"trials", "recovered", "bit_identical", "worst_steps_lost", "corrupted_steps_chosen", ...}
``corrupted_steps_chosen`` counts stable steps that fail their manifest check after the
trial; it must be 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers.chaos import reference_run, run_trial  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="where the runs go (default: a temp dir)")
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="deepscaler-faults-"))
    start = time.perf_counter()
    reference = reference_run(root / "reference", args.steps)
    print(f"reference run: {args.steps} steps in {time.perf_counter() - start:.0f}s ({root})", flush=True)
    print(f"{'trial':>5} {'victim':>12} {'delay s':>7} {'killed at':>9} {'resumed':>7} {'lost':>4} "
          f"{'tries':>5} {'identical':>9}  error", flush=True)
    trials = []
    for i in range(args.trials):
        t = run_trial(root / f"trial{i:02d}", reference, args.steps, args.seed * 1000 + i)
        trials.append(t)
        print(f"{i:>5} {t.victim:>12} {t.delay_s:>7.1f} {str(t.killed_at_weights):>9} {str(t.resumed_from):>7} "
              f"{t.steps_lost:>4} {t.attempts:>5} {str(t.identical):>9}  {t.error or ''}"
              f"{'; CORRUPT: ' + '; '.join(t.corrupt) if t.corrupt else ''}", flush=True)
    summary = {
        "trials": len(trials),
        "recovered": sum(t.recovered for t in trials),
        "bit_identical": sum(t.identical for t in trials),
        "worst_steps_lost": max((t.steps_lost for t in trials), default=0),
        "corrupted_steps_chosen": sum(len(t.corrupt) for t in trials),
        "victims": {v: sum(t.victim == v for t in trials) for v in sorted({t.victim for t in trials})},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    return 0 if summary["recovered"] == summary["trials"] and not summary["corrupted_steps_chosen"] else 1


if __name__ == "__main__":
    sys.exit(main())
