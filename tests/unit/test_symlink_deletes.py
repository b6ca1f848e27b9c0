"""No deletion of the project follows a symlink (docs/security.md): a link planted in the run
directory by someone who can write there must not make the lock takeover, retention or the
clean-up of partial steps delete files outside the run. The link itself goes, or the deletion
is refused with one line naming it; the ordinary cases still delete as before.

Real folders, real links, real deletions: nothing here is faked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deepscaler.run_lock import HOLDER, LOCK, RunLock, lock_dir
from deepscaler.store import STABLE, RunStore, StoreError, atomic_write_json, remove_tree


def outside_folder(tmp_path: Path, name: str = "outside") -> tuple[Path, set[str]]:
    """A folder outside the run with files that must survive (and one that looks like a step)."""
    d = tmp_path / name
    (d / "sub").mkdir(parents=True)
    for rel in ("precious.txt", STABLE, "model.safetensors", "sub/deep.txt"):
        (d / rel).write_text(rel)
    (d / "step_1").mkdir()
    (d / "step_1" / STABLE).write_text("{}")
    (d / "step_1.tmp-abc").mkdir()
    (d / "step_1.tmp-abc" / "half.bin").write_text("x")
    return d, files_under(d)


def files_under(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")}


def make_store(tmp_path: Path, kind: str = "weights", steps=(1, 2, 3)) -> RunStore:
    store = RunStore(tmp_path / "out", "run", 1)
    for s in steps:
        with store.write_step(kind, s) as d:
            (d / "a.bin").write_bytes(b"a" * 8)
    return store


# --------------------------------------------------------------------------- the helper


def test_remove_tree_removes_a_link_never_its_target(tmp_path):
    outside, before = outside_folder(tmp_path)
    link = tmp_path / "run" / "link"
    link.parent.mkdir()
    link.symlink_to(outside)
    remove_tree(link)
    assert not os.path.lexists(link) and files_under(outside) == before
    file_link = tmp_path / "run" / "file-link"
    file_link.symlink_to(outside / "precious.txt")
    remove_tree(file_link)
    assert not os.path.lexists(file_link) and (outside / "precious.txt").read_text() == "precious.txt"
    # the ordinary cases: a tree (with a link inside, which goes as a link), a file, nothing at all
    tree = tmp_path / "run" / "tree"
    (tree / "x").mkdir(parents=True)
    (tree / "x" / "f").write_text("f")
    (tree / "x" / "inner-link").symlink_to(outside)
    remove_tree(tree)
    assert not tree.exists() and files_under(outside) == before
    (tmp_path / "run" / "f").write_text("f")
    remove_tree(tmp_path / "run" / "f")
    remove_tree(tmp_path / "run" / "missing")
    assert list((tmp_path / "run").iterdir()) == []


# --------------------------------------------------------------------------- the lock takeover


def stale_lock(store: RunStore) -> None:
    """A LOCK whose holder stopped beating long ago: the next supervisor takes it over."""
    atomic_write_json(lock_dir(store) / HOLDER, {"host": "gone-host", "pid": 1, "since": 0.0, "job_id": None})
    old = time.time() - 3600
    os.utime(lock_dir(store) / HOLDER, (old, old))
    os.utime(lock_dir(store), (old, old))


def test_the_lock_takeover_removes_a_planted_stale_link_not_its_target(tmp_path):
    outside, before = outside_folder(tmp_path)
    store = RunStore(tmp_path / "out", "run", 1)
    store.root.mkdir(parents=True)
    planted = store.root / f"{LOCK}.stale-planted"
    planted.symlink_to(outside)
    stale_lock(store)
    with RunLock(store):
        assert (lock_dir(store) / HOLDER).is_file()
    assert files_under(outside) == before
    assert not os.path.lexists(planted)
    assert [p.name for p in store.root.iterdir() if p.name.startswith(LOCK)] == []  # the real stale lock went too


# --------------------------------------------------------------------------- retention and delete_steps


def test_retention_refuses_a_symlinked_step_and_deletes_nothing_outside(tmp_path):
    outside, before = outside_folder(tmp_path)
    store = make_store(tmp_path, steps=(2, 3))
    link = store.step_path("weights", 1)
    link.symlink_to(outside)  # looks stable: the outside folder has a STABLE file
    assert store.stable_steps("weights") == [1, 2, 3]
    with pytest.raises(StoreError, match=rf"^refusing to delete {link}: it is a symlink"):
        store.apply_retention("weights", keep_last=1)
    assert files_under(outside) == before
    with pytest.raises(StoreError, match=rf"^refusing to delete {link}: it is a symlink"):
        store.delete_steps("weights", [1])
    assert files_under(outside) == before
    link.unlink()
    # the nearby ordinary case: real steps go as before
    assert store.apply_retention("weights", keep_last=1).deleted == [2]
    assert store.stable_steps("weights") == [3] and sorted(p.name for p in store.kind_dir("weights").iterdir()) == [
        "step_3"]


@pytest.mark.parametrize("call", ["apply_retention", "delete_steps", "clean_partial"])
def test_a_symlinked_kind_folder_is_refused_and_its_target_kept(tmp_path, call):
    outside, before = outside_folder(tmp_path)
    store = RunStore(tmp_path / "out", "run", 1)
    store.root.mkdir(parents=True)
    store.kind_dir("checkpoints").symlink_to(outside)
    with pytest.raises(StoreError, match=rf"^refusing to delete under {store.kind_dir('checkpoints')}: it is a symlink"):
        {"apply_retention": lambda: store.apply_retention("checkpoints", keep_last=1, lease_ttl_s=0),
         "delete_steps": lambda: store.delete_steps("checkpoints", [1]),
         "clean_partial": lambda: store.clean_partial("checkpoints")}[call]()
    assert files_under(outside) == before


def test_clean_partial_removes_planted_links_themselves(tmp_path):
    outside, before = outside_folder(tmp_path)
    store = make_store(tmp_path, steps=(1,))
    d = store.kind_dir("weights")
    (d / "step_5.tmp-planted").symlink_to(outside)
    (d / "step_6").symlink_to(outside / "sub")  # an unmarked "step": no STABLE behind the link
    (d / "step_7.tmp-real").mkdir()  # the ordinary leftover of a crash
    (d / "step_7.tmp-real" / "half.bin").write_text("x")
    removed = store.clean_partial("weights")
    assert sorted(p.name for p in removed) == ["step_5.tmp-planted", "step_6", "step_7.tmp-real"]
    assert files_under(outside) == before
    assert sorted(p.name for p in d.iterdir()) == ["step_1"]


def test_clearing_an_eval_marker_never_deletes_through_a_linked_folder(tmp_path):
    outside, before = outside_folder(tmp_path)
    (outside / "PENDING").write_text("theirs")
    store = RunStore(tmp_path / "out", "run", 1)
    store.mark_eval_pending(1, ["math500"])
    store.clear_eval_pending(1)  # the ordinary case
    assert not (store.eval_dir(1) / "PENDING").exists()
    store.eval_dir(2).symlink_to(outside)
    with pytest.raises(StoreError, match=rf"^refusing to delete under {store.eval_dir(2)}: it is a symlink"):
        store.clear_eval_pending(2)
    assert (outside / "PENDING").read_text() == "theirs"
