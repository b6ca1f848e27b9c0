"""Durability order of the store's atomic writes: the data is fsynced before the rename that
publishes it, and the folder after. A crash or power loss between them would otherwise leave a
published name over empty or partial data, which no test of the visible files can see.

The calls are recorded by a spy that calls the real ``os.fsync``, ``os.replace`` and
``os.rename`` through (nothing is faked, the files written are real): only the order is
observed, which no crash on a live machine can show. Real counterparts (the visible outcome of
the same writes): tests/unit/test_store.py::test_atomic_file_replaces_or_keeps and
tests/unit/test_store.py::test_simulated_crash_is_ignored_by_readers_and_cleaned. The bugs
they catch are planted by tests/mutants.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepscaler.store import STABLE, RunStore, atomic_write_bytes


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """("fsync", path) and ("rename", src, dst) in the order they happen, every call real."""
    seen: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        seen.append(("rename", Path(src), Path(dst)))
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        seen.append(("rename", Path(src), Path(dst)))
        if (Path(src) / STABLE).exists():
            seen.append(("marked before its rename", Path(src)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return seen


def test_an_atomic_file_is_fsynced_then_renamed_then_its_folder_fsynced(tmp_path, calls):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    renames = [c for c in calls if c[0] == "rename"]
    assert len(renames) == 1 and renames[0][2] == target and renames[0][1] != target, calls
    tmp = renames[0][1]
    at = calls.index(renames[0])
    assert ("fsync", tmp) in calls[:at], f"the temp file was not fsynced before its rename: {calls}"
    assert ("fsync", tmp_path) in calls[at:], f"the folder was not fsynced after the rename: {calls}"


def test_every_file_of_a_step_is_fsynced_before_the_step_is_renamed_into_place(tmp_path, calls):
    store = RunStore(tmp_path / "out", "run1", 1)
    with store.write_step("weights", 3) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"x" * 10)
        (tmp / "sub" / "b.json").write_text("{}")
    final = store.step_path("weights", 3)
    publish = next(c for c in calls if c[0] == "rename" and c[2] == final)
    tmp = publish[1]
    before = calls[:calls.index(publish)]
    for rel in ("a.bin", "sub/b.json", "sub", "."):
        assert ("fsync", (tmp / rel).resolve()) in before, f"{rel} not fsynced before the rename: {calls}"
    # The marker is written (atomically) only after the rename, and the folder fsynced after it:
    # a crash before it leaves an unmarked step, which readers ignore and clean_partial removes.
    assert ("marked before its rename", tmp) not in calls, calls
    marker = next(i for i, c in enumerate(calls) if c[0] == "rename" and c[2] == final / STABLE)
    assert marker > calls.index(publish) and ("fsync", final.parent) in calls[marker:]
