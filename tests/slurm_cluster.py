"""Pytest plugin: the ``slurm_cluster`` fixture for tests that need the local Slurm cluster.

The cluster is ``slurm/local/up.sh``: four logical nodes (node1..node4), two fake GPUs each,
slurmdbd for ``sacct``, and the account ``TEST_ACCOUNT`` for root and the user who ran ``sudo``.
Without it the tests skip, except under CI (``CI=true`` or ``CI=1``), which always brings the
cluster up: there a missing cluster is a failure, not a skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_STATES = {"idle", "mixed", "allocated", "completing"}
HINT = "run `sudo bash slurm/local/up.sh`"
MARK = "# deepscaler slurm/local"  # first line of the slurm.conf that up.sh installs
CTLD = ("127.0.0.1", 6817)  # its SlurmctldHost and SlurmctldPort
TEST_ACCOUNT = "deepscaler-test"  # the account up.sh adds (an unknown one is recorded as the default, silently)


@dataclass(frozen=True)
class SlurmCluster:
    nodes: tuple[str, ...]
    partition: str
    accounts: tuple[str, ...]  # those this user may charge (sacctmgr's associations)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def slurm_env() -> dict[str, str]:
    """The current environment without ``SLURM_*`` variables (as if not inside a job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


def _run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=15, env=slurm_env())
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {out.returncode}: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def probe() -> SlurmCluster:
    """The running cluster, or RuntimeError saying what is missing."""
    for tool in ("sinfo", "sbatch", "sacct", "sacctmgr"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is not installed")
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        first = conf.read_text().split("\n", 1)[0]
    except OSError as exc:
        raise RuntimeError(f"cannot read {conf}: {exc.strerror}") from exc
    if not first.startswith(MARK):
        raise RuntimeError(f"{conf} is not the local cluster's (no {MARK!r} line); test jobs go nowhere else")
    try:  # fail fast: with slurmctld down, sinfo retries for about 9 s
        socket.create_connection(CTLD, timeout=2).close()
    except OSError as exc:
        raise RuntimeError(f"slurmctld is not running (nothing listens on {CTLD[0]}:{CTLD[1]})") from exc
    try:
        rows = [line.split() for line in _run("sinfo", "-h", "-N", "-o", "%N %T").splitlines() if line.strip()]
        partitions = _run("sinfo", "-h", "-o", "%P").split()
        _run("sacct", "-n", "-X", "-o", "JobID", "-S", "now")
        accounts = _run("sacctmgr", "-n", "-P", "show", "associations", f"users={pwd.getpwuid(os.getuid()).pw_name}",
                        "format=Account").split()
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{' '.join(exc.cmd)}` timed out") from exc
    ready = tuple(sorted({node for node, state in rows if state.rstrip("*~#$@+-") in READY_STATES}))
    if not ready:
        raise RuntimeError(f"no node is ready (sinfo: {rows or 'no nodes'})")
    default = [p.rstrip("*") for p in partitions if p.endswith("*")]
    return SlurmCluster(nodes=ready, partition=(default or partitions or [""])[0].rstrip("*"),
                        accounts=tuple(sorted(set(accounts))))


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The local Slurm cluster; skips (fails under CI) when it is not up."""
    try:
        return probe()
    except RuntimeError as exc:
        reason = f"no local Slurm cluster: {HINT} ({exc})"
        if in_ci():
            pytest.fail(f"{reason}; CI is set, so the cluster must be up", pytrace=False)
        pytest.skip(reason)
