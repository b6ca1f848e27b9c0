"""The slowest fault trials, kept out of the test suite (it must stay under 40 minutes on CI's
two cores): each is a pytest test marked ``trial``, run here on the local Slurm cluster.

    bash slurm/local/up.sh && .venv/bin/python benchmarks/slow_trials.py

Today: the time-limit requeue (a 2-minute ``slurm.time``, requeued at least once, the result
bit-identical to an uninterrupted run; about 8-9 minutes). Prints pytest's outcome and each
trial's duration, and exits with pytest's code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", "-m", "trial", "-q", "--durations=0", "tests"],
                            cwd=REPO).returncode)
