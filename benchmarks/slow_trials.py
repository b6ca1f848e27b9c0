"""The slowest fault trials, kept out of the test suite (it must stay under 40 minutes on CI's
two cores): each is a pytest test marked ``trial``, run here on the local Slurm cluster.

    bash slurm/local/up.sh && .venv/bin/python benchmarks/slow_trials.py

Today (about 3 minutes in all): SIGKILL of the orchestrator and of an inference server, then
resume to the same weights (the trainer's kill stays in the suite), and a newest checkpoint
without its STABLE marker (the truncated rank file stays in the suite), about a minute each.
The time-limit requeue and the node failure are back in the suite (about 2 minutes each,
shortened: tests/integration/test_slurm_stage.py, tests/faults/test_node_failure.py).

Prints pytest's outcome and each trial's duration, and exits with pytest's code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(subprocess.run([sys.executable, "-m", "pytest", "-m", "trial", "-q", "--durations=0", "tests"],
                            cwd=REPO).returncode)
