"""The shared-filesystem contract: the one module that knows every path of a run.

Processes on different nodes (orchestrator, trainer ranks, inference servers, eval tasks)
exchange data only through ``<output_dir>/<run>/stage<K>/``. Keeping every path and every
write/read rule here means a layout change is one edit, and the crash-safety rules
(write to a temp dir, fsync, rename, then mark STABLE) cannot be forgotten by a caller::

    <output_dir>/<run>/stage<K>/
      run.yaml                    resolved config of the latest submit or attempt
      run-history/<time>.yaml     every earlier run.yaml, named by when it was written
      rollouts/step_N/            orchestrator -> trainer
      weights/step_N/             trainer -> inference / eval (HF folder + probe.json)
      checkpoints/step_N/         full resumable state
      evals/step_N/<bench>.json   eval results (one atomic file per benchmark; evals/base/ for model.name)
      evals/step_N/PENDING        a sweep will evaluate weights/step_N: retention keeps that step
      metrics.jsonl               one JSON object per line
      logs/                       submitit and server logs
      servers/<name>.addr         "host:port" of each live inference server

Step directories (rollouts, weights, checkpoints) become visible only when complete: a
writer fills ``step_N.tmp-<uuid>``, fsyncs it, renames it to ``step_N`` and then writes
``step_N/STABLE``. Readers ignore anything without the marker. The marker holds a small
JSON manifest (file sizes and CRC32s) so a reader can also detect a partially copied directory
or a damaged file (:meth:`RunStore.verify_step`).

Each step kind has exactly ONE writer process (orchestrator for rollouts, trainer for
weights and checkpoints); only that writer may call :meth:`RunStore.write_step`,
:meth:`RunStore.clean_partial` and :meth:`RunStore.apply_retention` for the kind.

No pickle anywhere: tensors go through safetensors (``deepscaler.safetensors_io``, which
writes through :func:`atomic_file`), everything else through JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

from deepscaler.errors import one_line
from deepscaler.process import current_umask

STABLE = "STABLE"
BASE_EVAL = "base"  # evals/base/: the base model (model.name), which is no weights step
EVAL_PENDING = "PENDING"  # evals/step_N/PENDING: a sweep will evaluate weights/step_N; retention keeps it
STEP_KINDS = ("rollouts", "weights", "checkpoints")
# A lease older than this (no heartbeat) is treated as left behind by a dead process.
LEASE_TTL_S = 600.0
LEASE_HEARTBEAT_S = 60.0
LEASE_PREFIX = ".lease-"
LOG_TAIL_LINES = 20  # lines of a log shown with an error

_STEP_RE = re.compile(r"^step_(0|[1-9][0-9]*)$")
_TMP_RE = re.compile(r"^step_(0|[1-9][0-9]*)\.tmp-.+$")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]")


# --------------------------------------------------------------------------- errors


class StoreError(RuntimeError):
    """A broken filesystem-contract expectation. The message is one line."""


class StepNotFound(StoreError, FileNotFoundError):
    """A requested step is not stable (missing, unfinished, or deleted by retention)."""


class StepExists(StoreError, FileExistsError):
    """Writing over a STABLE step: written steps are immutable."""


class StepCorrupt(StoreError):
    """A STABLE step whose files do not match its manifest (partial copy, manual edit)."""


class StepTimeout(StoreError, TimeoutError):
    """``wait_for_step`` gave up."""


class DiskFull(StoreError, OSError):
    """No space (or quota) left while writing a step; nothing half-written remains."""


class NotWritable(StoreError, OSError):
    """A folder of the run turned read-only (or not ours) while writing; ``errno`` is the cause's."""


class CorruptFileError(StoreError, ValueError):
    """A safetensors/JSON file that cannot be parsed (truncated, garbage)."""


# --------------------------------------------------------------------------- small helpers


def _fsync_dir(path: Path) -> None:
    """Persist a directory entry (rename/create). Some network filesystems refuse; that is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:  # EINVAL/ENOTSUP on filesystems without directory fsync
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so a rename commits durable data."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                _fsync_file(p)
        _fsync_dir(Path(dirpath))


def remove_tree(path: Path) -> None:
    """Remove a file, a directory tree or a symlink, never what a symlink points to: a link
    planted in the run dir by someone who can write there must not make us delete outside it
    (docs/security.md). rmtree itself unlinks the links inside a tree without following them.
    Failures are left for a later clean_partial."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


_remove = remove_tree


def refuse_link(path: Path, action: str = "delete") -> Path:
    """``path`` itself, unless it is a symlink: a step or kind folder that points elsewhere is
    refused (one line) before anything in it is deleted."""
    if Path(path).is_symlink():
        raise StoreError(f"refusing to {action} {path}: it is a symlink (to {os.readlink(path)}); "
                         "the run's folders must be real folders (docs/security.md)")
    return Path(path)


def private_dir(path: Path) -> Path:
    """``path`` as a folder that only its owner can enter (0700), whatever the umask: for what is
    executable or secret, such as submitit's job pickles, which submitit unpickles when the job
    starts and on every requeue (a group member who could replace one would run code as the
    run's owner). Made if missing; a folder of ours left open by an older version is closed; a
    symlink, or a folder of another user, is refused (StoreError, one line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    if path.is_symlink():
        raise StoreError(f"refusing {path} as a private folder: it is a symlink (to {os.readlink(path)}); it must be "
                         "a real folder of this user (docs/security.md)")
    try:  # O_NOFOLLOW: the folder itself, never a link's target (a link could appear after the check)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise StoreError(f"refusing {path} as a private folder: {e.strerror.lower()}; it must be a real folder "
                         "of this user (docs/security.md)") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StoreError(f"refusing {path} as a private folder: it belongs to uid {st.st_uid}, not to this user "
                             f"(uid {os.geteuid()}); remove it (docs/security.md)")
        if st.st_mode & 0o7777 != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full(err: OSError, path: Path) -> "StoreError":
    """A full filesystem (or quota) while writing ``path``, with the free space: one line.
    The writer's temp files are gone by then; what was written before is untouched."""
    try:
        free = f"{shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"{path}: {os.strerror(err.errno).lower()} while writing ({free}); "
                    f"the previous stable step is intact")


def _is_not_writable(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _not_writable(err: OSError, path: Path, what: str | None = None) -> "StoreError":
    """A folder that turned read-only (a remount, a quota freeze, a chmod by another user) while
    writing ``path`` in it: one line naming the folder. Nothing already written is touched."""
    what = what or f"the previous version of {path.name} is intact"
    e = NotWritable(f"{path.parent}: {os.strerror(err.errno).lower()} while writing {path.name}; {what}")
    e.errno = err.errno  # so that write_step, around an atomic_file, names its step instead
    return e


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def _fmt_steps(steps: list[int], limit: int = 8) -> str:
    """Short one-line rendering of a step list (runs have thousands of steps)."""
    if not steps:
        return "none"
    if len(steps) <= limit:
        return "[" + ", ".join(map(str, steps)) + "]"
    head, tail = steps[:3], steps[-(limit - 3):]
    return "[" + ", ".join(map(str, head)) + ", ..., " + ", ".join(map(str, tail)) + f"] ({len(steps)} steps)"


def _check_private(st: os.stat_result, path: object, what: str, others: int) -> None:
    """StoreError unless ``st`` is this user's and has none of the ``others`` mode bits: a file
    the run trusts (a server's address) that a group member could have written or planted."""
    if st.st_uid != os.geteuid() or st.st_mode & others or not stat.S_ISREG(st.st_mode):
        who = "writable by group or others" if st.st_uid == os.geteuid() else f"owned by uid {st.st_uid}"
        raise StoreError(f"refusing {what} {path}: {who} (mode {st.st_mode & 0o7777:04o}); only this user "
                         f"(uid {os.geteuid()}) may write it. Remove it if it is not the run's own")


def _own_folder(path: Path, create: bool = True) -> None:
    """Make ``path`` (servers/) a folder that no group member can write when it is ours (a
    umask of 0002 makes folders group-writable); StoreError if it is a symlink or anyone may
    write it. A group member's folder is accepted (they may evaluate a run of the group's):
    what guards the files in it is :func:`_check_private` on each one.
    FileNotFoundError if it is missing and not ``create``."""
    if create:
        path.mkdir(parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"refusing {path}: not a folder (a symlink?)")
    if st.st_uid == os.geteuid() and st.st_mode & 0o022:
        os.chmod(path, st.st_mode & 0o7755)
    elif st.st_mode & 0o002:
        raise StoreError(f"refusing {path}: anyone may write it (mode {st.st_mode & 0o7777:04o})")


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step


def _check_kind(kind: str) -> str:
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {', '.join(STEP_KINDS)}")
    return kind


def _safe_name(name: str, what: str) -> str:
    if not name or _SAFE_NAME_RE.sub("_", name) != name or name.startswith("."):
        raise ValueError(f"{what} {name!r} must be non-empty, not start with '.', and use only [A-Za-z0-9_.-]")
    return name


def _json_default(obj: Any) -> Any:
    """Let 0-dim tensors and numpy scalars from the loss go straight into JSON."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps_json(obj: Any, *, indent: int | None = None) -> str:
    """JSON text the project writes everywhere (NaN allowed: a NaN loss must be recorded, not lost)."""
    return json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)


# --------------------------------------------------------------------------- single files


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp sibling of ``path`` for the body to write; then fsync it and rename it over
    ``path``, so readers see the old file or the new one, never a prefix. If the body fails
    the temp file goes and ``path`` is untouched; a full disk is DiskFull naming ``path``, a
    folder that turned read-only NotWritable naming it.
    (``deepscaler.safetensors_io.save_tensors`` writes its files through this.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a read-only folder keeps it: nobody reads temp names
            tmp.unlink(missing_ok=True)
        if _is_disk_full(err):
            raise _disk_full(err, path) from None
        if _is_not_writable(err) and not isinstance(err, NotWritable):
            raise _not_writable(err, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file so readers see either the old or the new content, never a prefix."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text file (run.yaml, servers files): tmp + fsync + rename + fsync dir."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Atomic JSON file (eval results, manifests, probe.json)."""
    return atomic_write_text(path, dumps_json(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a torn or garbage file gives a one-line error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({one_line(err)})") from None


# --------------------------------------------------------------------------- files a caller writes, log tails


def log_tail(path: str | os.PathLike, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (``logs/<name>.log``) under a heading naming it,
    for error messages; read as a stream, so a long server log costs no memory."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tail = deque(f, maxlen=lines)
    except FileNotFoundError:
        return f"(no log at {path})"
    return f"--- last {len(tail)} lines of {path} ---\n" + "".join(tail).rstrip("\n")


# --------------------------------------------------------------------------- retention (pure)


def cache_dir(cfg) -> Path:
    """Downloads and built models live on the shared filesystem, beside the runs."""
    return Path(cfg.data.cache_dir or os.path.join(cfg.run.output_dir, "cache"))


def steps_to_delete(
    steps: Iterable[int], keep_last: int, keep_every: int = 0, protected: Iterable[int] = ()
) -> list[int]:
    """Steps retention removes: all but the newest ``keep_last``, multiples of ``keep_every``
    (0: none; the eval sweep needs them) and ``protected`` ones. Pure, so it is table-tested."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 0:
        raise ValueError(f"keep_every must be an int >= 0, got {keep_every!r}")
    ordered = sorted(set(steps))
    keep = set(ordered[max(0, len(ordered) - keep_last):]) if keep_last else set()
    if keep_every:
        keep.update(s for s in ordered if s % keep_every == 0)
    keep.update(protected)
    return [s for s in ordered if s not in keep]


class RetentionResult(NamedTuple):
    deleted: list[int]  # steps removed
    leased: list[int]  # steps retention wanted to remove but a fresh lease protected


class MetricsLog(NamedTuple):
    records: list[dict]
    bad_lines: int  # lines that are not a JSON object (torn writes)
    torn_tail: bool  # the file ends in an unterminated, unparsable line


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class RunStore:
    """Every path of one stage of one run, plus the write/read/retention rules.

    Constructing a store creates nothing (status tools and login-node readers must not
    create directories); writers call :meth:`ensure_dirs`.
    """

    output_dir: Path
    run: str
    stage: int

    def __init__(self, output_dir: str | os.PathLike, run: str, stage: int):
        _safe_name(run, "run name")
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
            raise ValueError(f"stage must be an int >= 1, got {stage!r}")
        object.__setattr__(self, "output_dir", Path(output_dir))
        object.__setattr__(self, "run", run)
        object.__setattr__(self, "stage", stage)

    # ---------------------------------------------------------------- layout

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run

    @property
    def root(self) -> Path:
        """This stage's directory, ``<output_dir>/<run>/stage<K>``."""
        return self.stage_dir(self.stage)

    def stage_dir(self, k: int) -> Path:
        """Another stage of the same run (stage K+1 starts from stage K's newest checkpoint)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"stage must be an int >= 1, got {k!r}")
        return self.run_dir / f"stage{k}"

    def for_stage(self, k: int) -> "RunStore":
        """A store for another stage of this run, e.g. ``store.for_stage(K - 1).latest_stable("checkpoints")``."""
        return RunStore(self.output_dir, self.run, k)

    @property
    def run_yaml(self) -> Path:
        return self.root / "run.yaml"

    @property
    def run_history_dir(self) -> Path:
        """Earlier ``run.yaml`` versions of the stage, one file each (``deepscaler.launch.write_run_yaml``)."""
        return self.root / "run-history"

    @property
    def rollouts_dir(self) -> Path:
        return self.root / "rollouts"

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def evals_dir(self) -> Path:
        return self.root / "evals"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def servers_dir(self) -> Path:
        return self.root / "servers"

    @property
    def wandb_dir(self) -> Path:
        """The stage's W&B files: the forwarder's state and the (offline) runs (``deepscaler.tracking``)."""
        return self.root / "wandb"

    @property
    def handover_dir(self) -> Path:
        """``handover/<role>.json``: where each producer of steps stands (``deepscaler.handover``)."""
        return self.root / "handover"

    def kind_dir(self, kind: str) -> Path:
        return self.root / _check_kind(kind)

    def step_path(self, kind: str, step: int) -> Path:
        """Where ``step_N`` lives, whether or not it exists (no checks beyond the name)."""
        return self.kind_dir(kind) / f"step_{_check_step(step)}"

    def ensure_dirs(self) -> None:
        for d in (self.rollouts_dir, self.weights_dir, self.checkpoints_dir, self.evals_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        _own_folder(self.servers_dir)  # not group-writable: clients trust what is in it

    # ---------------------------------------------------------------- readers

    def is_stable(self, kind: str, step: int) -> bool:
        return (self.step_path(kind, step) / STABLE).is_file()

    def stable_steps(self, kind: str) -> list[int]:
        """Sorted steps that carry a STABLE marker; temp dirs, unmarked dirs and junk are ignored."""
        d = self.kind_dir(kind)
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return []
        steps = []
        for e in entries:
            m = _STEP_RE.match(e.name)
            if m and os.path.isfile(os.path.join(e.path, STABLE)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_stable(self, kind: str) -> int | None:
        steps = self.stable_steps(kind)
        return steps[-1] if steps else None

    def step_dir(self, kind: str, step: int, must_be_stable: bool = True) -> Path:
        """Path of ``step_N``; by default a one-line error if it is not stable, listing what is."""
        path = self.step_path(kind, step)
        if must_be_stable and not (path / STABLE).is_file():
            if path.exists():
                state = "exists but has no STABLE marker (unfinished or being deleted)"
            else:
                state = "does not exist"
            raise StepNotFound(f"{path} {state}; stable {kind} steps: {_fmt_steps(self.stable_steps(kind))}")
        return path

    def read_manifest(self, kind: str, step: int) -> dict:
        """The manifest in the STABLE marker: {"kind", "step", "files": {relpath: size}, ...}."""
        return read_json(self.step_dir(kind, step) / STABLE)

    def verify_step(self, kind: str, step: int, checksums: bool = False) -> dict:
        """Check a stable step against its manifest (catches partial copies), and with
        ``checksums`` the CRC32 of each file where the manifest has one (every kind since
        checksums are recorded for all: catches a damaged file of the right size); returns the
        manifest. A garbled manifest is a damaged step too (StepCorrupt, one line)."""
        path = self.step_dir(kind, step)
        try:
            manifest = self.read_manifest(kind, step)
        except CorruptFileError as e:
            raise StepCorrupt(str(e)) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
            raise StepCorrupt(f"{path / STABLE}: not a step manifest (no files mapping)")
        crcs = manifest.get("crc32", {}) if checksums else {}
        problems = []
        for rel, size in manifest.get("files", {}).items():
            try:
                actual = (path / rel).stat().st_size
            except FileNotFoundError:
                problems.append(f"{rel} missing")
                continue
            if actual != size:
                problems.append(f"{rel} has {actual} bytes, manifest says {size}")
            elif rel in crcs and _crc32(path / rel) != crcs[rel]:
                problems.append(f"{rel} does not match the checksum recorded at save")
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise StepCorrupt(f"{path}: {'; '.join(problems[:3])}{more}")
        return manifest

    def has_step(self, kind: str, step: int, or_newer: bool = False) -> bool:
        """``step_N`` is stable (with ``or_newer``: it or a later one is)."""
        if self.is_stable(kind, step):
            return True
        latest = self.latest_stable(kind) if or_newer else None
        return latest is not None and latest >= step

    def wait_for_step(self, kind: str, step: int, timeout_s: float, poll_s: float = 1.0, *, or_newer: bool = False,
                      check: Callable[[float], None] | None = None) -> Path:
        """Block until ``step_N`` (with ``or_newer``: it or a later one) is stable; returns its path.

        Sleeps a tenth of the time waited so far, between 20 ms and ``poll_s``: a hand-over
        is noticed at most ~10% late (each step of the loop has two), and a long wait costs
        one ``stat`` per ``poll_s`` on the shared filesystem. ``check(waited_s)`` runs on every
        poll and may raise to end the wait early (``deepscaler.handover``: the producer is
        gone)."""
        start = time.monotonic()
        while True:
            if self.has_step(kind, step, or_newer):
                found = step if self.is_stable(kind, step) else self.latest_stable(kind)
                return self.step_path(kind, found)
            waited = time.monotonic() - start
            if waited >= timeout_s:
                latest = self.latest_stable(kind)
                raise StepTimeout(
                    f"waited {waited:.1f}s for {self.step_path(kind, step)}/{STABLE}; newest stable {kind} step: "
                    f"{'none' if latest is None else latest}"
                )
            if check is not None:
                check(waited)
            time.sleep(max(0.0, min(max(0.02, waited / 10), poll_s, timeout_s - waited)))

    # ---------------------------------------------------------------- writers

    @contextlib.contextmanager
    def write_step(self, kind: str, step: int, checksums: Mapping[str, int] | None = None) -> Iterator[Path]:
        """Fill the yielded temp dir; on clean exit it becomes ``step_N`` with a STABLE marker.

        If the body raises, the temp dir is removed and no ``step_N`` appears. Publishing over a
        STABLE step is refused (written steps are immutable; a reader may be loading it). An
        unmarked ``step_N`` (crash between rename and marker) is replaced. The marker's manifest
        records each file's size and CRC32, which every reader of a restart or an eval checks
        (:meth:`verify_step`). ``checksums``: {relative path: CRC32} that the body filled while
        streaming files out (``deepscaler.safetensors_io``), so the largest files are not read
        back; the store computes the others. A folder that turns read-only is NotWritable.
        """
        final = self.step_path(kind, step)
        if (final / STABLE).is_file():
            raise StepExists(f"refusing to write {final}: it is already STABLE (written steps are immutable)")
        tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as err:
            if _is_not_writable(err):
                raise _not_writable(err, final, "the previous stable step is intact") from None
            raise
        try:
            yield tmp
            if (tmp / STABLE).exists():
                raise ValueError(f"{tmp}: the body wrote {STABLE}; the marker is the store's job")
            files = {}
            for dirpath, _dirs, names in os.walk(tmp):
                for name in names:
                    p = Path(dirpath, name)
                    files[p.relative_to(tmp).as_posix()] = p.stat().st_size
            known = dict(checksums or {})
            if set(known) - set(files):
                raise ValueError(f"{tmp}: checksums given for files the step does not have: "
                                 f"{sorted(set(known) - set(files))[:3]}")
            _fsync_tree(tmp)
            if (final / STABLE).is_file():  # re-check: the body may have run for a long time
                raise StepExists(f"refusing to write {final}: it became STABLE while writing")
            if final.exists():  # unmarked leftover of a crash between rename and marker
                trash = final.with_name(f"{final.name}.tmp-stale-{uuid.uuid4().hex[:12]}")
                os.rename(final, trash)
                _remove(trash)
            os.rename(tmp, final)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)  # a read-only folder keeps it for clean_partial
            if _is_disk_full(err):
                raise _disk_full(err, final) from None
            if _is_not_writable(err):
                raise _not_writable(err, final, "the previous stable step is intact") from None
            raise
        _fsync_dir(final.parent)
        manifest = {"kind": kind, "step": step, "created_unix": time.time(), "files": dict(sorted(files.items()))}
        # What a restart or an eval reads is checked to the byte (verify_step), whatever its kind.
        manifest["crc32"] = {rel: known[rel] if rel in known else _crc32(final / rel) for rel in manifest["files"]}
        try:
            atomic_write_json(final / STABLE, manifest)
        except NotWritable as err:  # renamed but unmarked: readers ignore it, clean_partial removes it
            raise _not_writable(err, final, "the previous stable step is intact") from None
        _fsync_dir(final.parent)

    def clean_partial(self, kind: str) -> list[Path]:
        """Remove ``step_N.tmp-*`` dirs and unmarked ``step_N`` dirs left by a crash.

        Only the single writer of ``kind`` may call this, before it starts writing: a temp dir
        of a live writer looks exactly like a stale one. Returns what was removed, for the log.
        A planted link is removed itself (:func:`remove_tree`); a symlinked kind folder is refused.
        """
        d = refuse_link(self.kind_dir(kind), "delete under")
        removed: list[Path] = []
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return removed
        for e in sorted(entries, key=lambda e: e.name):
            path = Path(e.path)
            # An unmarked step_N of any type goes: even a stray file of that name blocks writing it.
            if _TMP_RE.match(e.name) or (_STEP_RE.match(e.name) and not (path / STABLE).is_file()):
                _remove(path)
                removed.append(path)
        if removed:
            _fsync_dir(d)
        return removed

    # ---------------------------------------------------------------- leases and retention

    @contextlib.contextmanager
    def lease(
        self, kind: str, step: int, holder: str, heartbeat_s: float | None = LEASE_HEARTBEAT_S
    ) -> Iterator[Path]:
        """Hold ``step_N`` against retention while loading it (a server reloading weights, an eval).

        Creates ``step_N/.lease-<holder>-<id>`` and refreshes its mtime every ``heartbeat_s``;
        retention skips steps with a lease younger than its TTL, so a crashed holder's lease
        expires by itself. Raises StepNotFound if the step is not stable (or is being deleted).
        """
        holder = _SAFE_NAME_RE.sub("_", holder)[:80] or "anon"
        path = self.step_dir(kind, step)
        lease_file = path / f"{LEASE_PREFIX}{holder}-{uuid.uuid4().hex[:8]}"
        try:
            lease_file.touch(exist_ok=False)
        except FileNotFoundError:
            raise StepNotFound(f"{path} was deleted before the lease could be taken") from None
        # Retention removes STABLE before its final lease check: checking after creating the
        # lease means either retention sees our lease, or we see the step going away.
        if not (path / STABLE).is_file():
            lease_file.unlink(missing_ok=True)
            raise StepNotFound(f"{path} is being deleted by retention; stable {kind} steps: "
                               f"{_fmt_steps(self.stable_steps(kind))}")
        stop = threading.Event()
        beat = None
        if heartbeat_s:
            def _beat() -> None:
                while not stop.wait(heartbeat_s):
                    try:
                        os.utime(lease_file)
                    except OSError:
                        return
            beat = threading.Thread(target=_beat, name=f"lease-{holder}", daemon=True)
            beat.start()
        try:
            yield path
        finally:
            stop.set()
            if beat is not None:
                beat.join()
            lease_file.unlink(missing_ok=True)

    def fresh_leases(self, kind: str, step: int, ttl_s: float = LEASE_TTL_S) -> list[Path]:
        """Lease files of ``step_N`` refreshed within ``ttl_s``."""
        path = self.step_path(kind, step)
        now = time.time()
        fresh = []
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            return fresh
        for e in entries:
            if e.name.startswith(LEASE_PREFIX):
                try:
                    if now - e.stat().st_mtime < ttl_s:
                        fresh.append(Path(e.path))
                except FileNotFoundError:
                    pass
        return fresh

    def apply_retention(
        self,
        kind: str,
        keep_last: int,
        keep_every: int = 0,
        protected: Iterable[int] = (),
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> RetentionResult:
        """Delete stable steps per :func:`steps_to_delete`, skipping steps with a fresh lease.

        Each deletion first removes the STABLE marker (readers stop trusting the step), re-checks
        leases (restoring the marker if one appeared), then renames to a temp name and removes it,
        so no reader ever sees a half-deleted step as stable. keep_last must be >= 1: the newest
        step is what every consumer resumes or reloads from. A symlinked kind or step folder is
        refused (StoreError) rather than followed.
        """
        if isinstance(keep_last, int) and not isinstance(keep_last, bool) and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 for apply_retention, got {keep_last}")
        refuse_link(self.kind_dir(kind), "delete under")
        doomed = steps_to_delete(self.stable_steps(kind), keep_last, keep_every, protected)
        deleted: list[int] = []
        leased: list[int] = []
        for step in doomed:
            (deleted if self._delete_step(kind, step, lease_ttl_s) else leased).append(step)
        return RetentionResult(deleted, leased)

    def _delete_step(self, kind: str, step: int, lease_ttl_s: float | None) -> bool:
        """Delete one stable step; False if a fresh lease protects it (``lease_ttl_s=None``:
        leases are ignored). The marker goes first, so readers stop trusting the step before
        any file of it disappears; a lease that appears meanwhile restores the marker. A
        symlinked step is refused: its marker and files are someone else's."""
        path = refuse_link(self.step_path(kind, step))
        refuse_link(path.parent, "delete under")
        if lease_ttl_s is not None and self.fresh_leases(kind, step, lease_ttl_s):
            return False
        marker = path / STABLE
        try:
            manifest_bytes = marker.read_bytes()
            marker.unlink()
        except FileNotFoundError:
            return True
        _fsync_dir(path)
        if lease_ttl_s is not None and self.fresh_leases(kind, step, lease_ttl_s):
            atomic_write_bytes(marker, manifest_bytes)
            return False
        trash = path.with_name(f"{path.name}.tmp-del-{uuid.uuid4().hex[:12]}")
        os.rename(path, trash)
        _fsync_dir(path.parent)
        remove_tree(trash)  # leftovers are removed by clean_partial
        return True

    def delete_steps(self, kind: str, steps: Iterable[int]) -> list[int]:
        """Delete these stable steps (the kind's single writer only), returning those deleted.

        For a writer that resumes from an earlier step (what it wrote after that is about
        to be recomputed) or drops consumed steps. Leases are ignored: a reader still loading
        such a step fails loudly, never half-way.
        """
        refuse_link(self.kind_dir(kind), "delete under")
        doomed = sorted(set(steps) & set(self.stable_steps(kind)))
        for s in doomed:
            self._delete_step(kind, s, lease_ttl_s=None)
        return doomed

    # ---------------------------------------------------------------- evals

    def eval_dir(self, step: int | str) -> Path:
        """``evals/step_N`` for a weights step, ``evals/base`` for the base model (``model.name``,
        which is no written step)."""
        if step == BASE_EVAL:
            return self.evals_dir / BASE_EVAL
        return self.evals_dir / f"step_{_check_step(step)}"

    def eval_path(self, step: int | str, bench: str) -> Path:
        """``evals/step_N/<bench>.json`` (or ``evals/base/``). Evals are per-file atomic, not
        STABLE-marked step dirs, so a preempted eval task keeps the benchmarks it finished."""
        return self.eval_dir(step) / f"{_safe_name(bench, 'benchmark name')}.json"

    def write_eval(self, step: int | str, bench: str, result: Any) -> Path:
        return atomic_write_json(self.eval_path(step, bench), result)

    def read_evals(self) -> dict[int | str, dict[str, Any]]:
        """{step: {bench: result}} for every finished eval file (temp files ignored); the base
        model's results, if any, come first under the key ``"base"``."""
        out: dict[int | str, dict[str, Any]] = {}
        try:
            entries = list(os.scandir(self.evals_dir))
        except FileNotFoundError:
            return out
        for e in entries:
            m = _STEP_RE.match(e.name)
            if not ((m or e.name == BASE_EVAL) and e.is_dir()):
                continue
            key: int | str = int(m.group(1)) if m else BASE_EVAL
            for f in sorted(Path(e.path).glob("*.json")):
                if not f.name.startswith("."):
                    out.setdefault(key, {})[f.stem] = read_json(f)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] != BASE_EVAL, kv[0] if kv[0] != BASE_EVAL else 0)))

    def mark_eval_pending(self, step: int, benchmarks: Iterable[str]) -> Path:
        """Ask the trainer's retention to keep ``weights/step_N`` until these benchmarks are
        evaluated (an eval sweep writes this before it submits; the eval removes it when done)."""
        return atomic_write_json(self.eval_dir(step) / EVAL_PENDING,
                                 {"benchmarks": sorted(benchmarks), "created_unix": time.time()})

    def clear_eval_pending(self, step: int) -> None:
        (refuse_link(self.eval_dir(step), "delete under") / EVAL_PENDING).unlink(missing_ok=True)

    def pending_evals(self) -> list[int]:
        """Weights steps an eval sweep still has to evaluate: ``protected`` for retention."""
        try:
            entries = list(os.scandir(self.evals_dir))
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for e in entries
                      if (m := _STEP_RE.match(e.name)) and os.path.isfile(os.path.join(e.path, EVAL_PENDING)))

    # ---------------------------------------------------------------- servers

    def server_file(self, name: str) -> Path:
        return self.servers_dir / f"{_safe_name(name, 'server name')}.addr"

    def write_server_address(self, name: str, host: str, port: int) -> Path:
        """Announce a live inference server: one atomically written ``host:port`` file each,
        0644 at most (a stricter umask takes more away), in a servers/ that only this user can write (readers refuse
        anything else: :meth:`read_server_addresses`)."""
        _own_folder(self.servers_dir)
        with atomic_file(self.server_file(name)) as tmp:
            tmp.write_text(f"{host}:{int(port)}\n", encoding="utf-8")
            os.chmod(tmp, 0o644 & ~current_umask())  # never group-writable, never looser than the user's umask
        return self.server_file(name)

    def remove_server_address(self, name: str) -> None:
        self.server_file(name).unlink(missing_ok=True)

    def read_server_addresses(self) -> dict[str, str]:
        """{name: "host:port"} of announced servers (temp files ignored). The client sends the
        run's token to these addresses, so a file that another user owns, or that others could
        have written, is refused (StoreError naming it), as is a servers/ of another user."""
        out = {}
        try:
            _own_folder(self.servers_dir, create=False)
            entries = sorted(os.scandir(self.servers_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return out
        for e in entries:
            if e.name.endswith(".addr") and not e.name.startswith("."):
                try:
                    fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW)
                except FileNotFoundError:  # removed since the scan: a server stopping
                    continue
                except OSError as err:
                    raise StoreError(f"cannot read server address file {e.path} ({err.strerror}): "
                                     "it must be a plain file") from None
                with os.fdopen(fd, "rb") as f:
                    _check_private(os.fstat(f.fileno()), e.path, "server address file", 0o022)
                    text = f.read(4096).decode("utf-8", "replace").strip()
                if text:
                    out[e.name[: -len(".addr")]] = text
        return out

    # ---------------------------------------------------------------- metrics

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line with a single write, then fsync.

        If the file ends in a torn line (a crash mid-write), the record starts on a new line
        instead of gluing onto the fragment; the fragment stays and is counted as a bad line.
        This never truncates, so it is safe even if two processes append.
        """
        data = (dumps_json(dict(record)) + "\n").encode("utf-8")
        path = self.metrics_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_metrics(self) -> MetricsLog:
        """All records; torn or garbage lines are counted, never raised (a crash must not hide a run)."""
        try:
            raw = self.metrics_path.read_bytes()
        except FileNotFoundError:
            return MetricsLog([], 0, False)
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        records: list[dict] = []
        bad = 0
        for line in lines:
            if not line.strip():
                continue
            rec = _parse_record(line)
            if rec is None:
                bad += 1
            else:
                records.append(rec)
        torn = False
        if tail.strip():
            rec = _parse_record(tail)
            if rec is None:
                bad += 1
                torn = True
            else:
                records.append(rec)
        return MetricsLog(records, bad, torn)

    def repair_metrics(self) -> int:
        """Truncate a torn last line (single writer, at resume); returns the bytes dropped."""
        path = self.metrics_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return 0
        if not raw or raw.endswith(b"\n"):
            return 0
        cut = raw.rfind(b"\n") + 1
        if _parse_record(raw[cut:]) is not None:  # complete record missing only its newline
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            return 0
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        return len(raw) - cut


def _parse_record(line: bytes) -> dict | None:
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None
