"""The filesystem fills up while the trainer publishes: the previous stable steps stay intact,
the error names the path and the free space, and the run resumes once there is room.

A real small filesystem (tmpfs, mounted by the test) stands in for the cluster's; mounting
needs root, which CI has (elsewhere the test skips, saying so)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepscaler.store import DiskFull, RunStore
from tests.integration.test_trainer import final_weights, make_run, run_trainer
from tests.helpers.mounts import read_only, tmpfs

pytestmark = pytest.mark.slow


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    with tmpfs(mnt, "160M"):
        yield mnt


def fill(fs: Path, leave_bytes: int) -> Path:
    """A file that takes all but ``leave_bytes`` of the filesystem."""
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_store_refuses_cleanly_when_the_disk_is_full(small_fs: Path) -> None:
    store = RunStore(small_fs, "run", 1)
    with store.write_step("weights", 0) as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 1000)
    fill(small_fs, leave_bytes=64 * 1024)
    with pytest.raises(DiskFull) as err:
        with store.write_step("weights", 1) as tmp:
            (tmp / "big.bin").write_bytes(b"x" * 2_000_000)
    message = str(err.value)
    assert "\n" not in message and str(store.step_path("weights", 1)) in message and "MiB free" in message
    assert store.stable_steps("weights") == [0]
    store.verify_step("weights", 0)
    assert not [p for p in store.weights_dir.iterdir() if p.name != "step_0"]  # no temp dir left behind


def test_trainer_stops_with_the_path_and_free_space_then_resumes(small_fs: Path) -> None:
    run_yaml, store = make_run(small_fs, steps=4)
    out = run_trainer(run_yaml, "run.max_steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert store.stable_steps("checkpoints") == [2]
    filler = fill(small_fs, leave_bytes=256 * 1024)

    out = run_trainer(run_yaml, "--resume-step", "latest")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("error: ") and "no space left on device" in last
    assert "MiB free" in last and str(small_fs) in last
    assert store.stable_steps("checkpoints") == [2] and store.is_stable("weights", 2)
    store.verify_step("checkpoints", 2)
    store.verify_step("weights", 2)

    filler.unlink()
    out = run_trainer(run_yaml, "--resume-step", "latest")
    assert out.returncode == 0, out.stderr[-2000:]
    assert store.is_stable("weights", 4) and final_weights(store, 4)


def test_trainer_stops_with_one_line_when_a_folder_turns_read_only(tmp_path: Path) -> None:
    """checkpoints/ remounted read-only (as a cluster filesystem can be) under a running trainer:
    the weights it published stay, and it stops with the one-line error naming the folder."""

    run_yaml, store = make_run(tmp_path, steps=2)
    with read_only(store.checkpoints_dir):
        out = run_trainer(run_yaml)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-3000:]
    assert last == (f"error: {store.checkpoints_dir}: read-only file system while writing step_2; "
                    "the previous stable step is intact")
    assert store.stable_steps("checkpoints") == [] and store.stable_steps("weights") == [0, 1, 2]
    store.verify_step("weights", 2, checksums=True)
