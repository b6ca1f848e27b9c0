"""Real filesystems that fail, for the fault tests: a small tmpfs that fills up, and a folder
that turns read-only (a read-only bind mount of it over itself).

Why not chmod: CI runs as root, and root writes through any mode bits. A bind mount remounted
``ro`` refuses root too (EROFS), like a cluster filesystem remounted read-only. Mounting needs
root (CI has it, and fails if it cannot; elsewhere the test skips, saying so)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.slurm_cluster import in_ci


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (an existing folder) read-only until the block ends, for every user."""
    done = _mount("--bind", str(path), str(path))
    if done.returncode == 0:
        done = _mount("-o", "remount,bind,ro", str(path))
        if done.returncode != 0:
            subprocess.run(["umount", str(path)], check=False)
    _require(done, f"a read-only bind mount of {path}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """A real filesystem of ``size`` (e.g. "160M") mounted on the empty folder ``path``; with
    ``inodes`` that many files at most (1: its root only, so even mkdir finds the disk full,
    which it does not for lack of space alone)."""
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    _require(_mount("-t", "tmpfs", "-o", options, "tmpfs", str(path)), f"a tmpfs on {path}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _require(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        if in_ci():
            pytest.fail(f"cannot mount {what} under CI: {done.stderr.strip()}")
        pytest.skip(f"mounting {what} needs root: {done.stderr.strip()}")
