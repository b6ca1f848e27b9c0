"""The shared-filesystem contract: atomic publish, readers, retention, leases, metrics, atomic files.
(Tensor files: test_safetensors_io.py.)"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from deepscaler import store as store_mod
from deepscaler.store import (STABLE, CorruptFileError, DiskFull, RunStore, StepCorrupt, StepExists, StepNotFound,
                              StepTimeout, atomic_file, atomic_write_json, atomic_write_text, log_tail, read_json,
                              steps_to_delete)


def run_together(*targets) -> None:
    """Run the callables in threads at once and wait for them."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "out", "run1", 2)


def publish_files(store: RunStore, kind: str, step: int, files: dict[str, bytes] | None = None) -> Path:
    files = files if files is not None else {"a.bin": b"x" * 10, "sub/b.json": b"{}"}
    with store.write_step(kind, step) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return store.step_path(kind, step)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp-" in p.name) if d.exists() else []


# --------------------------------------------------------------------------- layout


def test_layout_paths_and_construction_creates_nothing(tmp_path: Path) -> None:
    s = RunStore(tmp_path / "out", "run1", 2)
    root = tmp_path / "out" / "run1" / "stage2"
    assert s.root == root
    assert s.run_yaml == root / "run.yaml"
    assert s.rollouts_dir == root / "rollouts"
    assert s.weights_dir == root / "weights"
    assert s.checkpoints_dir == root / "checkpoints"
    assert s.evals_dir == root / "evals"
    assert s.metrics_path == root / "metrics.jsonl"
    assert s.logs_dir == root / "logs"
    assert s.servers_dir == root / "servers"
    assert s.step_path("weights", 7) == root / "weights" / "step_7"
    assert s.eval_path(7, "aime24") == root / "evals" / "step_7" / "aime24.json"
    assert s.stage_dir(1) == tmp_path / "out" / "run1" / "stage1"
    assert s.for_stage(1).root == s.stage_dir(1)
    assert not (tmp_path / "out").exists()  # readers (status, login node) must not create dirs
    s.ensure_dirs()
    assert all(d.is_dir() for d in (s.rollouts_dir, s.weights_dir, s.checkpoints_dir, s.logs_dir, s.servers_dir))


@pytest.mark.parametrize("run, stage", [("", 1), ("a/b", 1), ("..", 1), ("ok", 0), ("ok", True), ("ok", "1")])
def test_bad_run_or_stage_rejected(tmp_path: Path, run: str, stage: object) -> None:
    with pytest.raises(ValueError):
        RunStore(tmp_path, run, stage)  # type: ignore[arg-type]


def test_unknown_kind_and_bad_step_rejected(store: RunStore) -> None:
    with pytest.raises(ValueError, match="unknown step kind 'evals'"):
        with store.write_step("evals", 1):
            pass
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="non-negative int"):
            store.step_path("weights", bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- publish


def test_publish_creates_stable_step_with_manifest(store: RunStore) -> None:
    path = publish_files(store, "weights", 3)
    assert path == store.weights_dir / "step_3"
    assert (path / "a.bin").read_bytes() == b"x" * 10
    assert (path / "sub" / "b.json").read_bytes() == b"{}"
    manifest = json.loads((path / STABLE).read_text())
    assert manifest["kind"] == "weights" and manifest["step"] == 3
    assert manifest["files"] == {"a.bin": 10, "sub/b.json": 2}
    assert store.verify_step("weights", 3) == manifest
    assert store.stable_steps("weights") == [3]
    assert store.latest_stable("weights") == 3
    assert store.latest_stable("checkpoints") is None
    assert store.stable_steps("rollouts") == []  # kind dir does not exist yet
    assert leftovers(store.weights_dir) == []
    assert sorted(p.name for p in path.iterdir()) == [STABLE, "a.bin", "sub"]  # no marker tmp left


def test_publish_body_raises_leaves_nothing(store: RunStore) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with store.write_step("rollouts", 5) as tmp:
            (tmp / "shard0.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not store.step_path("rollouts", 5).exists()
    assert leftovers(store.rollouts_dir) == []
    assert store.stable_steps("rollouts") == []


def test_publish_refuses_to_overwrite_stable_step(store: RunStore) -> None:
    publish_files(store, "weights", 1, {"w": b"original"})
    with pytest.raises(StepExists) as info:
        with store.write_step("weights", 1) as tmp:
            (tmp / "w").write_bytes(b"new")
    msg = str(info.value)
    assert "\n" not in msg and "step_1" in msg and "STABLE" in msg
    assert (store.step_path("weights", 1) / "w").read_bytes() == b"original"
    assert leftovers(store.weights_dir) == []


def test_publish_refuses_if_step_became_stable_while_writing(store: RunStore) -> None:
    with pytest.raises(StepExists, match="became STABLE while writing"):
        with store.write_step("weights", 1) as tmp:
            (tmp / "w").write_bytes(b"mine")
            publish_files(store, "weights", 1, {"w": b"theirs"})
    assert (store.step_path("weights", 1) / "w").read_bytes() == b"theirs"
    assert leftovers(store.weights_dir) == []


def test_publish_replaces_unmarked_leftover(store: RunStore) -> None:
    # Crash between rename and marker: step_2 exists without STABLE.
    stale = store.step_path("checkpoints", 2)
    stale.mkdir(parents=True)
    (stale / "old_only").write_bytes(b"stale")
    publish_files(store, "checkpoints", 2, {"state": b"fresh"})
    assert sorted(p.name for p in stale.iterdir()) == [STABLE, "state"]
    assert store.stable_steps("checkpoints") == [2]
    assert leftovers(store.checkpoints_dir) == []


def test_body_may_not_write_the_marker(store: RunStore) -> None:
    with pytest.raises(ValueError, match="marker is the store's job"):
        with store.write_step("weights", 1) as tmp:
            (tmp / STABLE).write_text("{}")
    assert not store.step_path("weights", 1).exists()


def test_simulated_crash_is_ignored_by_readers_and_cleaned(store: RunStore) -> None:
    publish_files(store, "weights", 1)
    wd = store.weights_dir
    (wd / "step_3.tmp-deadbeef").mkdir()
    (wd / "step_3.tmp-deadbeef" / "model.safetensors").write_bytes(b"half")
    (wd / "step_4").mkdir()  # renamed, marker never written
    (wd / "step_4" / "model.safetensors").write_bytes(b"whole")
    (wd / "step_05").mkdir()  # junk: non-canonical number
    (wd / "step_05" / STABLE).write_text("{}")
    (wd / "step_abc").mkdir()
    (wd / "notes.txt").write_text("hi")
    (wd / "step_6").write_text("a file, not a dir")

    assert store.stable_steps("weights") == [1]
    assert store.latest_stable("weights") == 1
    assert not store.is_stable("weights", 4)
    with pytest.raises(StepNotFound) as info:
        store.step_dir("weights", 4)
    msg = str(info.value)
    assert "\n" not in msg and "step_4" in msg and "no STABLE marker" in msg and "[1]" in msg
    with pytest.raises(StepNotFound, match=r"does not exist; stable weights steps: \[1\]"):
        store.step_dir("weights", 9)
    assert store.step_dir("weights", 9, must_be_stable=False) == wd / "step_9"

    removed = store.clean_partial("weights")
    # A stray file named like a step is unmarked too (and would block publishing step 6).
    assert sorted(p.name for p in removed) == ["step_3.tmp-deadbeef", "step_4", "step_6"]
    assert sorted(p.name for p in wd.iterdir()) == ["notes.txt", "step_05", "step_1", "step_abc"]
    assert store.clean_partial("weights") == []
    assert store.clean_partial("rollouts") == []  # missing kind dir is fine


def test_step_not_found_message_abbreviates_long_lists(store: RunStore) -> None:
    for s in range(12):
        publish_files(store, "rollouts", s, {"x": b"1"})
    with pytest.raises(StepNotFound) as info:
        store.step_dir("rollouts", 99)
    msg = str(info.value)
    assert "[0, 1, 2, ..., 7, 8, 9, 10, 11] (12 steps)" in msg and "\n" not in msg


def test_verify_step_detects_partial_copy(store: RunStore) -> None:
    path = publish_files(store, "weights", 2, {"a": b"1234", "b": b"5678"})
    (path / "a").write_bytes(b"12")
    (path / "b").unlink()
    with pytest.raises(StepCorrupt) as info:
        store.verify_step("weights", 2)
    msg = str(info.value)
    assert "a has 2 bytes, manifest says 4" in msg and "b missing" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["rollouts", "weights", "checkpoints"])
def test_every_kind_records_checksums_and_verify_finds_a_changed_byte(store: RunStore, kind: str) -> None:
    """What a restart or an eval reads is checked to the byte, whichever kind it is."""
    path = publish_files(store, kind, 1, {"a.bin": b"0123456789", "sub/b.json": b"{}"})
    assert set(store.read_manifest(kind, 1)["crc32"]) == {"a.bin", "sub/b.json"}
    store.verify_step(kind, 1, checksums=True)
    (path / "a.bin").write_bytes(b"0123456780")  # same size: only the checksum can tell
    store.verify_step(kind, 1)  # sizes alone pass
    with pytest.raises(StepCorrupt, match=r"step_1: a.bin does not match the checksum recorded at save$"):
        store.verify_step(kind, 1, checksums=True)


def test_supplied_checksums_are_recorded_and_the_rest_computed(store: RunStore) -> None:
    """A writer that computed a file's CRC32 while streaming it hands it over (no re-read)."""
    import zlib

    known = {"a.bin": zlib.crc32(b"abc")}
    with store.write_step("weights", 1, checksums=known) as tmp:
        (tmp / "a.bin").write_bytes(b"abc")
        (tmp / "b.json").write_bytes(b"{}")
    assert store.read_manifest("weights", 1)["crc32"] == {"a.bin": zlib.crc32(b"abc"), "b.json": zlib.crc32(b"{}")}
    with pytest.raises(ValueError, match="c.bin"):  # a checksum of a file the step does not have is a writer bug
        with store.write_step("weights", 2, checksums={"c.bin": 1}) as tmp:
            (tmp / "a.bin").write_bytes(b"abc")
    assert store.stable_steps("weights") == [1] and leftovers(store.weights_dir) == []


def test_a_garbled_manifest_is_a_damaged_step(store: RunStore) -> None:
    path = publish_files(store, "checkpoints", 3)
    (path / STABLE).write_text('{"kind": "checkpoints", "fi')
    with pytest.raises(StepCorrupt, match=r"step_3/STABLE: not valid JSON"):
        store.verify_step("checkpoints", 3)


def test_the_restart_point_rewrites_what_a_restart_reads_if_it_is_damaged(store: RunStore, capsys) -> None:
    """A damaged weights step at the restart point goes (the trainer publishes it again from the
    checkpoint), and so does a damaged rollouts step the orchestrator would read its data
    progress from (the checkpoint has the same); intact ones, and older damaged weights that the
    servers pass over themselves, stay. A second restart then finds nothing to repair."""
    from deepscaler.launch import restart_point

    for step in (2, 4):
        publish_files(store, "checkpoints", step)
    for step in (2, 3, 4):
        publish_files(store, "weights", step)
    for step in (3, 4):
        publish_files(store, "rollouts", step)
    (store.step_path("weights", 4) / "a.bin").write_bytes(b"y" * 10)  # a changed byte: same size
    os.truncate(store.step_path("weights", 2) / "a.bin", 3)  # older: not what a restart loads
    os.truncate(store.step_path("rollouts", 3) / "a.bin", 3)

    assert restart_point(store, "latest") == "4"
    err = capsys.readouterr().err
    assert "weights/step_4: a.bin does not match the checksum" in err and "discarded weights [4]" in err
    assert "rollouts/step_3: a.bin has 3 bytes, manifest says 10" in err
    assert store.stable_steps("weights") == [2, 3] and store.stable_steps("rollouts") == []
    assert store.stable_steps("checkpoints") == [2, 4]
    publish_files(store, "weights", 4)  # what the trainer does first
    assert restart_point(store, "latest") == "4" and "damaged" not in capsys.readouterr().err
    assert store.stable_steps("weights") == [2, 3, 4]


def test_a_fresh_start_over_leftovers_drops_damaged_steps_and_what_follows(store: RunStore, capsys) -> None:
    """No checkpoint yet: the trainer reads the rollouts kept from step 0 on, the servers load
    the newest weights. A damaged rollouts step goes with every later one (the orchestrator
    samples them again from there); damaged weights go (the trainer writes step 0 again)."""
    from deepscaler.launch import restart_point

    for step in (0, 1, 2):
        publish_files(store, "rollouts", step)
        publish_files(store, "weights", step)
    os.truncate(store.step_path("rollouts", 1) / "a.bin", 0)
    (store.step_path("weights", 2) / "sub" / "b.json").unlink()
    assert restart_point(store, "latest") is None
    assert store.stable_steps("rollouts") == [0] and store.stable_steps("weights") == [0, 1]
    assert "sub/b.json missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- wait_for_step


def test_wait_for_step_times_out_with_clear_message(store: RunStore) -> None:
    publish_files(store, "weights", 1)
    polls: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(StepTimeout) as info:
        store.wait_for_step("weights", 2, timeout_s=0.2, poll_s=0.05, check=polls.append)
    elapsed = time.monotonic() - t0
    # Order, not speed: it waited the timeout out, polling, and gave up on the first poll past
    # it (no further sleep or poll), however slow the machine.
    assert elapsed >= 0.2 and polls and max(polls) < 0.2
    msg = str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert "\n" not in msg and "waited 0.2" in msg and str(store.step_path("weights", 2) / STABLE) in msg
    assert msg.endswith("newest stable weights step: 1")
    with pytest.raises(StepTimeout, match="newest stable rollouts step: none"):
        store.wait_for_step("rollouts", 0, timeout_s=0.0)


def test_wait_for_step_succeeds_when_another_thread_publishes(store: RunStore) -> None:
    def later() -> None:
        time.sleep(0.2)
        publish_files(store, "weights", 4)

    t = threading.Thread(target=later)
    t.start()
    try:
        path = store.wait_for_step("weights", 4, timeout_s=10, poll_s=0.02)
    finally:
        t.join()
    assert path == store.step_path("weights", 4)
    assert (path / "a.bin").read_bytes() == b"x" * 10


# --------------------------------------------------------------------------- retention


@pytest.mark.parametrize(
    "steps, keep_last, keep_every, protected, expected",
    [
        (range(1, 11), 3, 0, (), [1, 2, 3, 4, 5, 6, 7]),  # newest 3 only
        (range(1, 11), 3, 5, (), [1, 2, 3, 4, 6, 7]),  # + multiples of 5
        (range(0, 7), 2, 4, (), [1, 2, 3]),  # step 0 is a multiple of everything
        (range(1, 11), 3, 5, {2, 7}, [1, 3, 4, 6]),  # protected survive
        (range(1, 11), 3, 5, {42}, [1, 2, 3, 4, 6, 7]),  # unknown protected step: no effect
        ([1, 2, 3], 0, 0, (), [1, 2, 3]),  # pure function allows keeping nothing
        ([1, 2, 3], 5, 0, (), []),  # fewer steps than keep_last
        ([], 3, 5, (), []),
        ([9, 3, 3, 6, 1], 1, 3, (), [1]),  # unsorted, duplicated input
        ([10, 20, 30, 40], 1, 20, (), [10, 30]),
    ],
)
def test_steps_to_delete_table(steps, keep_last, keep_every, protected, expected) -> None:
    assert steps_to_delete(steps, keep_last, keep_every, protected) == expected


@pytest.mark.parametrize("keep_last, keep_every", [(-1, 0), (1, -1), (1.5, 0), (True, 0)])
def test_steps_to_delete_rejects_bad_arguments(keep_last, keep_every) -> None:
    with pytest.raises(ValueError):
        steps_to_delete([1, 2], keep_last, keep_every)


def test_apply_retention_respects_keep_protected_and_leases(store: RunStore) -> None:
    for s in range(1, 8):
        publish_files(store, "weights", s)
    # doomed by the table: keep newest 2 (6, 7) + multiples of 3 (3, 6) + protected 1 -> delete 2, 4, 5
    with store.lease("weights", 4, "server-a:8000"):
        res = store.apply_retention("weights", keep_last=2, keep_every=3, protected={1})
        assert res.deleted == [2, 5] and res.leased == [4]
        assert store.stable_steps("weights") == [1, 3, 4, 6, 7]
        assert store.verify_step("weights", 4)["step"] == 4  # untouched while leased
    assert not list(store.step_path("weights", 4).glob(".lease-*"))  # released
    res = store.apply_retention("weights", keep_last=2, keep_every=3, protected={1})
    assert res.deleted == [4] and res.leased == []
    assert store.stable_steps("weights") == [1, 3, 6, 7]
    assert sorted(p.name for p in store.weights_dir.iterdir()) == ["step_1", "step_3", "step_6", "step_7"]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        store.apply_retention("weights", keep_last=0)


def test_stale_lease_does_not_block_retention(store: RunStore) -> None:
    for s in range(1, 4):
        publish_files(store, "weights", s)
    dead = store.step_path("weights", 1) / ".lease-crashed-server-0000"
    dead.touch()
    old = time.time() - 3600
    os.utime(dead, (old, old))
    assert store.fresh_leases("weights", 1, ttl_s=600) == []
    res = store.apply_retention("weights", keep_last=1, lease_ttl_s=600)
    assert res.deleted == [1, 2] and res.leased == []


def test_lease_appearing_during_deletion_restores_marker(store: RunStore, monkeypatch) -> None:
    """A reader's lease lands between retention's two lease checks: injected there (a real
    schedule hits that instant too rarely to test); the lease files are real. Real
    counterpart: tests/unit/test_store.py::test_concurrent_retention_never_deletes_a_leased_step."""
    for s in range(1, 3):
        publish_files(store, "weights", s)
    before = (store.step_path("weights", 1) / STABLE).read_bytes()
    calls = []
    real = RunStore.fresh_leases

    def racing(self, kind, step, ttl_s=store_mod.LEASE_TTL_S):
        calls.append(step)
        # First check: no lease. Second check (marker already removed): a reader got in.
        return [Path("x")] if len(calls) == 2 else real(self, kind, step, ttl_s)

    monkeypatch.setattr(RunStore, "fresh_leases", racing)
    res = store.apply_retention("weights", keep_last=1)
    assert res.deleted == [] and res.leased == [1]
    assert (store.step_path("weights", 1) / STABLE).read_bytes() == before
    assert store.stable_steps("weights") == [1, 2]


def test_lease_requires_stable_step_and_heartbeats(store: RunStore) -> None:
    with pytest.raises(StepNotFound):
        with store.lease("weights", 1, "srv"):
            pass
    publish_files(store, "weights", 1)
    with store.lease("weights", 1, "host:8000/x", heartbeat_s=0.05) as path:
        assert path == store.step_path("weights", 1)
        (lease_file,) = path.glob(".lease-*")
        assert lease_file.name.startswith(".lease-host_8000_x-")  # holder sanitised
        old = time.time() - 3600
        os.utime(lease_file, (old, old))
        assert store.fresh_leases("weights", 1, ttl_s=60) == []
        deadline = time.monotonic() + 30  # a 0.05 s heartbeat: generous on a loaded machine
        while not store.fresh_leases("weights", 1, ttl_s=60) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.fresh_leases("weights", 1, ttl_s=60) == [lease_file]
        assert store.verify_step("weights", 1)  # a lease file does not break the manifest
    assert not list(path.glob(".lease-*"))


def test_lease_refused_while_step_is_being_deleted(store: RunStore) -> None:
    path = publish_files(store, "weights", 1)
    (path / STABLE).unlink()  # retention's first move
    with pytest.raises(StepNotFound):
        with store.lease("weights", 1, "srv"):
            pass
    assert not list(path.glob(".lease-*"))


# --------------------------------------------------------------------------- concurrency


def test_concurrent_reader_never_sees_incomplete_stable_step(store: RunStore) -> None:
    """A reader polling while a writer publishes many steps sees every file of every stable step."""
    n_steps, names = 40, [f"shard{i}.bin" for i in range(4)]
    errors: list[str] = []
    seen: set[int] = set()
    done = threading.Event()

    def content(step: int, name: str) -> bytes:
        return f"{step}:{name}:".encode() * 200

    def writer() -> None:
        try:
            for s in range(n_steps):
                with store.write_step("rollouts", s) as tmp:
                    for name in names:
                        (tmp / name).write_bytes(content(s, name))
        finally:
            done.set()

    def reader() -> None:
        while not errors:
            finished = done.is_set()  # read before the pass: the last pass sees every step
            for s in store.stable_steps("rollouts"):
                d = store.step_dir("rollouts", s)
                for name in names:
                    try:
                        data = (d / name).read_bytes()
                    except FileNotFoundError:
                        errors.append(f"step {s}: {name} missing")
                        continue
                    if data != content(s, name):
                        errors.append(f"step {s}: {name} incomplete")
                seen.add(s)
            if finished:
                return

    run_together(writer, reader)
    assert not errors, errors[:5]
    assert seen == set(range(n_steps))


def test_concurrent_retention_never_deletes_a_leased_step(store: RunStore) -> None:
    """Writer publishes + applies retention (keep_last=2); a reader leases steps and reads them.
    A leased step must stay complete for the whole lease."""
    n_steps, names = 40, ["model.bin", "probe.json"]
    errors: list[str] = []
    reads = []
    done = threading.Event()

    def writer() -> None:
        try:
            for s in range(n_steps):
                with store.write_step("weights", s) as tmp:
                    for name in names:
                        (tmp / name).write_bytes(b"w" * (100 + s))
                store.apply_retention("weights", keep_last=2)
        finally:
            done.set()

    def reader() -> None:
        while not done.is_set():
            latest = store.latest_stable("weights")
            if latest is None:
                time.sleep(0.001)
                continue
            for s in (latest, max(latest - 1, 0)):
                try:
                    with store.lease("weights", s, "reader", heartbeat_s=None) as d:
                        for _ in range(3):  # "loading" takes a while
                            for name in names:
                                if (d / name).read_bytes() != b"w" * (100 + s):
                                    errors.append(f"step {s}: {name} changed")
                            time.sleep(0.001)
                        # (STABLE may flicker off for an instant while retention backs off,
                        # but the directory and its files must stay.)
                        if not d.is_dir():
                            errors.append(f"step {s} deleted while leased")
                        reads.append(s)
                except StepNotFound:
                    pass  # deleted before we got the lease: allowed
                except FileNotFoundError as err:
                    errors.append(f"step {s}: {err}")

    run_together(writer, reader)
    assert not errors, errors[:5]
    assert reads, "the reader never got a lease"
    final = store.stable_steps("weights")
    assert final[-2:] == [n_steps - 2, n_steps - 1]
    assert len(final) <= 4  # at most the newest 2 plus steps a lease saved at the last run
    store.apply_retention("weights", keep_last=2)
    assert store.stable_steps("weights") == [n_steps - 2, n_steps - 1]
    assert store.clean_partial("weights") == []  # retention left no temp dirs behind


# --------------------------------------------------------------------------- single files, evals, servers


def test_atomic_write_text_and_json(tmp_path: Path) -> None:
    p = tmp_path / "d" / "run.yaml"
    atomic_write_text(p, "a: 1\n")
    atomic_write_text(p, "a: 2\n")
    assert p.read_text() == "a: 2\n"
    j = atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "t": torch.tensor(0.5)})
    assert read_json(j) == {"b": [1, 2], "t": 0.5}
    assert sorted(q.name for q in tmp_path.rglob("*") if ".tmp-" in q.name) == []


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    """A real full disk (a 256 KiB tmpfs) and a real read-only folder (a read-only bind
    mount): the old content stays, and no temp file is left where the write could go."""
    from tests.helpers.mounts import read_only, tmpfs

    fs = tmp_path / "fs"
    fs.mkdir()
    with tmpfs(fs, "256k"):
        p = fs / "f.txt"
        atomic_write_text(p, "old")
        with pytest.raises(DiskFull, match=re.escape(str(p))):
            atomic_write_text(p, "new" * 200_000)
        assert p.read_text() == "old"
        assert [q.name for q in fs.iterdir()] == ["f.txt"]
        with read_only(fs):
            with pytest.raises(OSError, match="read-only"):
                atomic_write_text(p, "new")
            assert p.read_text() == "old"
        assert [q.name for q in fs.iterdir()] == ["f.txt"]


def test_read_json_corrupt_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "torn.json"
    p.write_text('{"a": [1, 2')
    with pytest.raises(CorruptFileError) as info:
        read_json(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_evals_are_per_file(store: RunStore) -> None:
    store.write_eval(10, "aime24", {"pass@1": 0.3})
    store.write_eval(10, "math500", {"pass@1": 0.8})
    store.write_eval(0, "aime24", {"pass@1": 0.28})
    (store.evals_dir / "step_10" / ".math500.json.tmp-abc").write_text("{")
    (store.evals_dir / "junk").mkdir()
    assert store.read_evals() == {0: {"aime24": {"pass@1": 0.28}},
                                  10: {"aime24": {"pass@1": 0.3}, "math500": {"pass@1": 0.8}}}
    with pytest.raises(ValueError):
        store.eval_path(1, "../escape")


def test_server_address_files(store: RunStore) -> None:
    assert store.read_server_addresses() == {}
    store.write_server_address("inference-0", "node12", 8000)
    store.write_server_address("inference-1", "node13", 8001)
    (store.servers_dir / ".inference-2.addr.tmp-xyz").write_text("node14:")  # in-flight write
    assert store.read_server_addresses() == {"inference-0": "node12:8000", "inference-1": "node13:8001"}
    store.remove_server_address("inference-0")
    store.remove_server_address("inference-0")  # idempotent
    assert store.read_server_addresses() == {"inference-1": "node13:8001"}


# --------------------------------------------------------------------------- metrics


def test_metrics_append_and_read(store: RunStore) -> None:
    assert store.read_metrics() == ([], 0, False)
    store.append_metrics({"step": 1, "reward": 0.5, "loss": torch.tensor(-0.25)})
    store.append_metrics({"step": 2, "reward": float("nan")})
    log = store.read_metrics()
    assert log.bad_lines == 0 and not log.torn_tail
    assert log.records[0] == {"step": 1, "reward": 0.5, "loss": -0.25}
    assert log.records[1]["step"] == 2 and log.records[1]["reward"] != log.records[1]["reward"]  # NaN kept
    assert store.metrics_path.read_text().count("\n") == 2


def test_metrics_torn_tail_detected_and_not_glued(store: RunStore) -> None:
    store.append_metrics({"step": 1})
    with open(store.metrics_path, "ab") as f:
        f.write(b'{"step": 2, "rew')  # crash mid-write
    log = store.read_metrics()
    assert log.records == [{"step": 1}] and log.bad_lines == 1 and log.torn_tail
    store.append_metrics({"step": 3})  # must start on a new line
    log = store.read_metrics()
    assert log.records == [{"step": 1}, {"step": 3}] and log.bad_lines == 1 and not log.torn_tail


def test_metrics_repair_truncates_torn_tail(store: RunStore) -> None:
    store.append_metrics({"step": 1})
    good = store.metrics_path.read_bytes()
    with open(store.metrics_path, "ab") as f:
        f.write(b'{"step": 2')
    assert store.repair_metrics() == len(b'{"step": 2')
    assert store.metrics_path.read_bytes() == good
    assert store.read_metrics() == ([{"step": 1}], 0, False)
    assert store.repair_metrics() == 0
    # A complete record that only lacks its newline is kept, and terminated.
    with open(store.metrics_path, "ab") as f:
        f.write(b'{"step": 2}')
    assert store.repair_metrics() == 0
    store.append_metrics({"step": 3})
    assert store.read_metrics() == ([{"step": 1}, {"step": 2}, {"step": 3}], 0, False)


def test_metrics_garbage_lines_counted(store: RunStore) -> None:
    store.metrics_path.parent.mkdir(parents=True)
    store.metrics_path.write_bytes(b'{"step": 1}\nnot json\n[1, 2]\n\n\xff\xfe\n{"step": 2}\n')
    log = store.read_metrics()
    assert log.records == [{"step": 1}, {"step": 2}] and log.bad_lines == 3 and not log.torn_tail


# --------------------------------------------------------------------------- files a caller writes, log tails


def test_atomic_file_replaces_or_keeps(tmp_path: Path) -> None:
    p = tmp_path / "d" / "f.bin"
    with atomic_file(p) as tmp:
        assert tmp.parent == p.parent and tmp != p
        tmp.write_bytes(b"new")
        assert not p.exists()  # visible only once the body is done
    assert p.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_file(p) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert p.read_bytes() == b"new" and [q.name for q in p.parent.iterdir()] == ["f.bin"]


def test_atomic_file_disk_full_names_the_file(tmp_path: Path) -> None:
    import errno

    p = tmp_path / "f.bin"
    with pytest.raises(DiskFull) as info:
        with atomic_file(p) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(info.value)
    assert msg.startswith(str(p)) and "no space left on device" in msg and "MiB free" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())


def test_a_kind_folder_that_turns_read_only_is_one_line_naming_it(store: RunStore) -> None:
    """weights/ (or checkpoints/) remounted read-only between two steps, and while one is written:
    a one-line StoreError naming the folder, and the stable steps stay as they were."""
    from deepscaler.safetensors_io import save_tensors
    from tests.helpers.mounts import read_only

    publish_files(store, "weights", 1)
    publish_files(store, "checkpoints", 1)
    with read_only(store.weights_dir):
        with pytest.raises(store_mod.StoreError) as info:
            publish_files(store, "weights", 2)
    msg = str(info.value)
    assert msg.startswith(f"{store.weights_dir}: read-only file system while writing step_2") and "\n" not in msg
    assert isinstance(info.value, OSError)  # callers that catch OSError still do

    with pytest.raises(store_mod.StoreError) as info:
        with store.write_step("checkpoints", 2) as tmp:
            (tmp / "a.bin").write_bytes(b"x")
            with read_only(store.checkpoints_dir):
                save_tensors(tmp / "model.safetensors", {"w": torch.zeros(2)})  # through atomic_file
    msg = str(info.value)
    assert f"{store.checkpoints_dir}" in msg and "read-only file system" in msg and "\n" not in msg
    assert store.stable_steps("weights") == [1] and store.stable_steps("checkpoints") == [1]
    store.verify_step("weights", 1, checksums=True)
    store.clean_partial("checkpoints")  # writable again: the writer's next start removes its temp dir
    assert leftovers(store.checkpoints_dir) == [] and leftovers(store.weights_dir) == []


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "server0.log"
    assert log_tail(log) == f"(no log at {log})"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert log_tail(log) == f"--- last 20 lines of {log} ---\n" + "\n".join(f"line {i}" for i in range(10, 30))
    assert log_tail(log, 2) == f"--- last 2 lines of {log} ---\nline 28\nline 29"
    log.write_bytes(b"ok\n\xff\xfe broken utf-8")  # never raises on a garbled log
    assert log_tail(log).endswith("ok\n\ufffd\ufffd broken utf-8")


def test_no_pickle_in_store() -> None:
    src = Path(store_mod.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+pickle", src, re.M)
    assert not re.search(r"(?<![\w.])torch\.(load|save)\(", src)
