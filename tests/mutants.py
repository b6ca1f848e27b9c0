"""Mutation check: does the suite fail when a known bug is planted?

    .venv/bin/python -m tests.mutants [--only NAME ...] [--list] [--no-baseline] [--timeout S]

Copies the working tree (the files git tracks or would track, so uncommitted edits and new
test files count) into a temp dir, plants ONE bug at a time there (an exact snippet of one file
replaced by another), runs that mutant's short list of tests with ``python -m pytest -x -q`` in
the copy, and restores the file. A mutant whose tests still pass SURVIVED: the promise it
breaks is not held by any test. A snippet that is no longer in its file is an error, not a
skip, so a refactor cannot quietly turn a mutant into a no-op; so is a test that is not found.
First (unless ``--no-baseline``) every listed test must pass on the unmutated copy, else a
"kill" would mean nothing.

Ends with one JSON line: {"mutants", "killed", "survived": [names], "seconds"}; exits 1 if a
mutant survived, 2 on an error of the check itself. To add a mutant, append a :class:`Mutant`
to :data:`MUTANTS`: pick the smallest tests that should kill it (unit tests where they can;
each mutant's run should stay well under 2 minutes on 2 busy cores).

Not a test: pytest never collects it (not named ``test_*.py``, and ``__test__ = False``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__test__ = False  # a script that runs tests: pytest must not collect it

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # per mutant; a hang counts as killed (pytest-timeout would fail it in CI), and is named
# pytest's exit codes: 0 passed, 1 a test failed, 2 interrupted (a collection error: the mutant
# broke an import, which kills it too), 4 usage error (a listed test does not exist), 5 no tests.
KILLED_CODES = (1, 2)


@dataclass(frozen=True)
class Mutant:
    name: str  # short, unique: what the bug is
    file: str  # relative to the repository root
    old: str  # an exact snippet, found exactly once in ``file``
    new: str  # what replaces it: the bug
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root
    timeout_s: float | None = None  # where a surviving bug makes a test hang: a shorter bound (else --timeout)

    def plant(self, text: str) -> str:
        count = text.count(self.old)
        if count != 1:
            raise SystemExit(f"mutants.py: mutant {self.name}: its snippet is found {count} times in {self.file} "
                             f"(expected once); update the mutant to the code: {self.old!r}")
        return text.replace(self.old, self.new)


UNIT = "tests/unit/"
MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ the lock
    Mutant("lock: squeue's state column misread", "deepscaler/run_lock.py",
           '"-o", "%T"', '"-o", "%t"', (UNIT + "test_run_lock.py",)),
    Mutant("lock: a dead holder's pid counted as alive", "deepscaler/run_lock.py",
           "    except ProcessLookupError:\n        return False",
           "    except ProcessLookupError:\n        return True",
           (UNIT + "test_run_lock.py",)),
    # ------------------------------------------------------------------ atomic writes
    Mutant("atomic_file: no fsync before the rename", "deepscaler/store.py",
           "        _fsync_file(tmp)\n        os.replace(tmp, path)", "        os.replace(tmp, path)",
           (UNIT + "test_store.py", UNIT + "test_store_fsync.py")),
    Mutant("atomic_file: written in place, no rename", "deepscaler/store.py",
           "        yield tmp\n        _fsync_file(tmp)\n        os.replace(tmp, path)",
           "        yield path\n        _fsync_file(path)",
           (UNIT + "test_store.py", UNIT + "test_store_fsync.py")),
    Mutant("write_step: the step's files not fsynced before the rename", "deepscaler/store.py",
           "            _fsync_tree(tmp)\n", "",
           (UNIT + "test_store.py", UNIT + "test_store_fsync.py")),
    Mutant("write_step: STABLE marked before the rename", "deepscaler/store.py",
           "            os.rename(tmp, final)\n        except BaseException",
           "            (tmp / STABLE).write_text('{}')\n"
           "            os.rename(tmp, final)\n        except BaseException",
           (UNIT + "test_store.py", UNIT + "test_store_fsync.py")),
    # ------------------------------------------------------------------ retention and deletion
    Mutant("retention: keeps one step too few", "deepscaler/store.py",
           "ordered[max(0, len(ordered) - keep_last):]", "ordered[max(0, len(ordered) - keep_last + 1):]",
           (UNIT + "test_store.py",)),
    Mutant("retention: keeps one step too many", "deepscaler/store.py",
           "ordered[max(0, len(ordered) - keep_last):]", "ordered[max(0, len(ordered) - keep_last - 1):]",
           (UNIT + "test_store.py",)),
    Mutant("deletion: a symlinked step or kind folder not refused", "deepscaler/store.py",
           "    if Path(path).is_symlink():\n        raise StoreError(f\"refusing to {action}",
           "    if False:\n        raise StoreError(f\"refusing to {action}",
           (UNIT + "test_symlink_deletes.py",)),
    Mutant("deletion: remove_tree follows a symlink to a folder", "deepscaler/store.py",
           "    if path.is_dir() and not path.is_symlink():", "    if path.is_dir():",
           (UNIT + "test_symlink_deletes.py",)),
    # ------------------------------------------------------------------ the loss
    Mutant("advantage: group mean not subtracted", "deepscaler/advantages.py",
           "adv = (grouped - mean) / (std + eps)", "adv = grouped / (std + eps)",
           (UNIT + "test_advantages.py",)),
    Mutant("advantage: not divided by the group std", "deepscaler/advantages.py",
           "adv = (grouped - mean) / (std + eps)", "adv = (grouped - mean) / (1.0 + eps)",
           (UNIT + "test_advantages.py",)),
    Mutant("loss: clip bounds swapped (low <-> high)", "deepscaler/trainer/loss.py",
           "torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)", "torch.clamp(ratio, 1.0 - clip_high, 1.0 + clip_low)",
           (UNIT + "test_loss.py",)),
    Mutant("loss: min instead of max of the two surrogates", "deepscaler/trainer/loss.py",
           "pg = torch.maximum(unclipped, clipped)", "pg = torch.minimum(unclipped, clipped)",
           (UNIT + "test_loss.py",)),
    # ------------------------------------------------------------------ resume
    Mutant("resume: the trainer starts one step after its checkpoint", "deepscaler/trainer/train.py",
           'step, first_step = state["step"], state["progress"]["stage_first_step"]',
           'step, first_step = state["step"] + 1, state["progress"]["stage_first_step"]',
           ("tests/integration/test_trainer.py::test_resume_after_a_kill_gives_bit_identical_weights[3]",)),
    Mutant("resume: the orchestrator samples from one step after the checkpoint", "deepscaler/orchestrator.py",
           'return checkpoint, checkpoint_state(store, checkpoint)["progress"]["data"]',
           'return checkpoint + 1, checkpoint_state(store, checkpoint)["progress"]["data"]',
           (UNIT + "test_resume_point.py",)),
    Mutant("resume: latest picks a checkpoint older than the newest intact one", "deepscaler/stage.py",
           "        for step in reversed(steps):\n            try:",
           "        for step in reversed(steps[:-1] or steps):\n            try:",
           (UNIT + "test_store.py", UNIT + "test_resume_point.py")),
    Mutant("resume: restart_point keeps the weights after the checkpoint", "deepscaler/launch.py",
           '(("checkpoints", point + 1), ("weights", point + 1), ("rollouts", point))',
           '(("checkpoints", point + 1), ("weights", point + 2), ("rollouts", point))',
           (UNIT + "test_resume_point.py",)),
    # ------------------------------------------------------------------ eval
    Mutant("eval: the server loads another step than the one scored", "deepscaler/eval/run.py",
           '"--weights-step", "base" if what == BASE_EVAL else str(what)]',
           '"--weights-step", "base" if what == BASE_EVAL else str(max(0, what - 1))]',
           ("tests/integration/test_eval_run.py::test_same_seed_same_numbers",)),
    Mutant("eval: a step named N resolves to another step", "deepscaler/eval/run.py",
           "    step = int(model)\n    check_weights_step(store, step)",
           "    step = max(store.stable_steps('weights') or [int(model)])\n    check_weights_step(store, step)",
           (UNIT + "test_eval_cli.py", UNIT + "test_resume_point.py")),
    # ------------------------------------------------------------------ reward
    Mutant("reward: integer gold matched by a non-integer expression", "deepscaler/reward.py",
           "    if literal_integers and _INTEGER_RE.match(g) and not _INTEGER_RE.match(a):",
           "    if False:",
           (UNIT + "test_reward.py",)),
    Mutant("reward: plain fractions compared by value, not literally", "deepscaler/reward.py",
           "    if fa is not None and fg is not None:\n        return fa == fg",
           "    if fa is not None and fg is not None and fa == fg:\n        return True",
           (UNIT + "test_reward.py",)),
    # ------------------------------------------------------------------ security
    Mutant("server: any bearer token accepted", "deepscaler/inference/server.py",
           'hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())',
           'header.startswith("Bearer ")',
           (UNIT + "test_security.py::test_a_request_without_the_token_gets_401",
            UNIT + "test_security.py::test_only_the_exact_token_is_served")),
    Mutant("security: run.umask loosens a stricter umask of the user's", "deepscaler/process.py",
           "    return current | configured", "    return configured",
           (UNIT + "test_security.py",)),
    # ------------------------------------------------------------------ damaged files
    Mutant("verify: a changed byte of the right size passes", "deepscaler/store.py",
           "            elif rel in crcs and _crc32(path / rel) != crcs[rel]:",
           "            elif False:",
           (UNIT + "test_store.py",)),
    # ------------------------------------------------------------------ liveness
    Mutant("hand-over: a producer that stopped reporting is waited for forever", "deepscaler/handover.py",
           'elif p.state == "running" and age > stale_s:', 'elif p.state == "running" and age > stale_s * 1e6:',
           (UNIT + "test_handover.py",)),
    Mutant("client: a frozen server's request never given up", "deepscaler/inference/client.py",
           "            if time.monotonic() - last_ok >= limit:\n                with self._lock:",
           "            if False:\n                with self._lock:",
           (UNIT + "test_inference_client.py::test_a_request_to_a_frozen_server_is_given_up_after_the_liveness_bound",),
           timeout_s=60),  # the request's own bound is an hour: without the check it hangs
]


def tree_files(repo: Path) -> list[str]:
    """What git tracks or would track (not ignored), as it is in the working tree now."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and (repo / p).is_file()})


def copy_tree(repo: Path, dest: Path) -> None:
    for rel in tree_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def pytest_env(root: Path) -> dict:
    """The copy's package first on the path, and nothing of the checkout's cached bytecode."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DEEPSCALER_FAULT", None)
    return env


def run_tests(root: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[int | None, str, float]:
    """(pytest's exit code or None on timeout, the tail of its output, seconds)."""
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            "-m", "not trial", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=root, env=pytest_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the session pytest leads
        kill_leftovers(root)  # and a stage's processes, which run in sessions of their own
        out, _ = proc.communicate()
        code = None
    return code, (out or "")[-3000:], time.perf_counter() - t0


def kill_leftovers(root: Path) -> None:
    """SIGKILL the processes of this user that run from the copy (its path in their command
    line or as their working directory)."""
    mark = str(root).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if int(pid) != os.getpid() and (mark in Path(f"/proc/{pid}/cmdline").read_bytes()
                                            or cwd.startswith(str(root))):
                os.kill(int(pid), 9)
        except OSError:
            pass


def check_import_root(root: Path) -> None:
    """The copy, not the checkout's editable install, must be what the tests import."""
    where = subprocess.run([sys.executable, "-c", "import deepscaler; print(deepscaler.__file__)"], cwd=root,
                           env=pytest_env(root), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"mutants.py: the copy imports deepscaler from {where}, not from {root}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="TEXT", help="run the mutants whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of every test on the unmutated copy")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds per mutant (default {TIMEOUT_S})")
    args = p.parse_args()
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("mutants.py: two mutants share a name")
    chosen = [m for m in MUTANTS if not args.only or any(t in m.name for t in args.only)]
    for m in chosen:  # every snippet, before anything runs: a stale mutant fails at once
        m.plant((REPO / m.file).read_text())
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}\n    {' '.join(m.tests)}")
        return 0
    if not chosen:
        raise SystemExit(f"mutants.py: no mutant matches {args.only}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepscaler-mutants-") as tmp:
        root = Path(tmp)
        copy_tree(REPO, root)
        check_import_root(root)
        originals = {m.file: (root / m.file).read_text() for m in chosen}
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, out, seconds = run_tests(root, tests, args.timeout * 4)
            print(f"baseline ({len(tests)} test paths, unmutated): exit {code}, {seconds:.0f} s", flush=True)
            if code != 0:
                print(out, file=sys.stderr)
                print("mutants.py: the tests fail without any mutant; fix that first", file=sys.stderr)
                return 2
        survived, killed = [], 0
        for m in chosen:
            path = root / m.file
            path.write_text(m.plant(originals[m.file]))
            try:
                code, out, seconds = run_tests(root, m.tests, m.timeout_s or args.timeout)
            finally:
                path.write_text(originals[m.file])
            if code == 0:
                survived.append(m.name)
                verdict = "SURVIVED"
            elif code is None or code in KILLED_CODES:
                killed += 1
                verdict = "killed" if code is not None else "killed (timed out)"
            else:
                print(out, file=sys.stderr)
                print(f"mutants.py: mutant {m.name}: pytest exit {code} (a listed test is missing?): {m.tests}",
                      file=sys.stderr)
                return 2
            print(f"{verdict:>18}  {seconds:5.0f} s  {m.name}", flush=True)
    print(json.dumps({"mutants": len(chosen), "killed": killed, "survived": survived,
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
