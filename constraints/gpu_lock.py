"""Make or check ``constraints/gpu.txt``, the cluster's locked environment.

    python constraints/gpu_lock.py            # resolve .[gpu] afresh and rewrite gpu.txt
    python constraints/gpu_lock.py --check    # resolve gpu.txt's pins; fail on any drift

Both ask pip's resolver (``pip install --dry-run --ignore-installed --report``) against the
package index, for this interpreter's Python and platform (the lock is made on CPython 3.11,
Linux x86_64). Nothing is installed. Why pip is a pinned version run from its wheel: a dry
run of an older pip (23.2, what a venv of Python 3.11 comes with) still downloads every wheel
it resolved (several GB here: vllm, torch, the CUDA libraries), and ``--use-feature=fast-deps`` reads a wheel's metadata with HTTP range
requests where the index serves no PEP 658 metadata file (a PyPI mirror may not), so a
resolve moves megabytes, not gigabytes. Why the machine's pip configuration is ignored: local
find-links, extra indexes and global constraints would make the lock this machine's.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints" / "gpu.txt"
PIP = "26.3"  # the resolver that made the lock; a new pip may resolve differently
PROJECT = "deepscaler"
# The packages whose versions make the numbers (docs/eval.md) and the stack (docs/cluster.md).
KEY = ("vllm", "torch", "transformers", "deepspeed")
# pip settings that only say how to reach the index; every other PIP_* variable is dropped.
REACH = ("PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")

HEADER = """\
# The cluster's locked environment: every package of `pip install -e ".[gpu]"`, pinned
# (vllm {vllm}, torch {torch}, transformers {transformers}, deepspeed {deepspeed}; {count} packages):
#
#     pip install -c constraints/gpu.txt -e ".[gpu]"
#
# Resolved for CPython 3.11 on Linux x86_64 (manylinux_2_28 wheels: glibc 2.28 or newer). On
# another Python, packages needed only there are left unpinned: regenerate the lock there.
#
# torch {torch} from PyPI is the CUDA 13.0 build (cuda-toolkit, nvidia-*-cu13): GPU nodes need an
# NVIDIA driver of the r580 branch or newer (`nvidia-smi` shows it). With an older driver, see
# docs/cluster.md ("Install on the cluster", "NVIDIA driver older than torch's CUDA").
#
# Made by pip's resolver, not by hand (pip {pip}, {date}):
#
#     python constraints/gpu_lock.py           # rewrites this file, header included
#     python constraints/gpu_lock.py --check   # what CI checks: tests/integration/test_gpu_lock.py
#
# which runs `pip install --dry-run --ignore-installed --report R -e ".[gpu]"` (no install) and
# pins every package of R but this project. Regenerate after changing setup.cfg's requirements
# or to move to new releases.
"""


class LockError(RuntimeError):
    """A lock that does not parse or does not match. One line."""


# --------------------------------------------------------------------------- reading


def parse_lock(text: str, where: str = "constraints/gpu.txt") -> dict[str, str]:
    """{canonical name: version} of a lock; every line is a comment, blank, or ``name==version``."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if not m:
            raise LockError(f"{where}:{n}: {line!r} is not an exact pin (name==version)")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise LockError(f"{where}:{n}: {m.group(1)} is pinned twice")
        pins[name] = m.group(2)
    return pins


def setup_requirements(setup_cfg: Path = REPO / "setup.cfg", extra: str = "gpu") -> list[Requirement]:
    """The base install's requirements plus those of ``extra``, as setup.cfg declares them."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg, encoding="utf-8")

    def lines(text: str) -> list[Requirement]:
        return [Requirement(line.split("#")[0].strip()) for line in text.splitlines()
                if line.split("#")[0].strip()]

    return lines(cfg["options"]["install_requires"]) + lines(cfg["options.extras_require"][extra])


def resolved(report: dict) -> dict[str, str]:
    """{canonical name: version} that a ``pip --report`` would install, this project left out."""
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]
            if canonicalize_name(item["metadata"]["name"]) != PROJECT}


def requires_of(report: dict, package: str) -> list[Requirement]:
    for item in report["install"]:
        if canonicalize_name(item["metadata"]["name"]) == package:
            return [Requirement(r) for r in item["metadata"].get("requires_dist", [])]
    raise LockError(f"the resolve has no {package}")


# --------------------------------------------------------------------------- checking


def range_problems(pins: dict[str, str], requirements: list[Requirement]) -> list[str]:
    """setup.cfg against the lock: each package it names (the key ones first) is pinned, in its range."""
    problems = [f"{name} is not pinned" for name in KEY if name not in pins]
    for req in requirements:
        name = canonicalize_name(req.name)
        if name not in pins:
            if name not in KEY:
                problems.append(f"{req.name} (setup.cfg: {req}) is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside setup.cfg's {req}")
    return problems


def report_problems(pins: dict[str, str], report: dict) -> list[str]:
    """A resolve under the lock against the lock: the same set, the same versions, and torch
    pinned to the version vllm's own metadata requires."""
    got = resolved(report)
    problems = [f"{n}=={v} is resolved but not pinned" for n, v in sorted(got.items()) if n not in pins]
    problems += [f"{n}=={v} is pinned but not needed" for n, v in sorted(pins.items()) if n not in got]
    problems += [f"{n} resolved to {got[n]}, pinned {v}" for n, v in sorted(pins.items()) if n in got and got[n] != v]
    marker_env = {**report.get("environment", {}), "extra": ""}
    for req in requires_of(report, "vllm"):
        if canonicalize_name(req.name) != "torch" or (req.marker and not req.marker.evaluate(marker_env)):
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        pinned = pins.get("torch")
        if pinned is None or (exact and exact != [pinned]) or not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"vllm=={got.get('vllm')} requires {req}, the lock pins torch=={pinned}")
    return problems


# --------------------------------------------------------------------------- resolving


def pip_env() -> dict[str, str]:
    """This environment without the machine's pip configuration (files and PIP_* variables)
    except how to reach the index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in REACH}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def fetch_pip(folder: Path) -> Path:
    """pip ``PIP`` as a wheel in ``folder``; ``python <wheel>/pip`` runs it."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--retries", "1", "--dest", str(folder), f"pip=={PIP}"],
                          env=pip_env(), capture_output=True, text=True, timeout=300)
    wheels = list(folder.glob(f"pip-{PIP}-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise LockError(f"could not download pip=={PIP}: {_tail(done.stderr)}")
    return wheels[0]


def _tail(text: str, lines: int = 6) -> str:
    """pip's errors and its explanation of a conflict, on one line (else its last lines)."""
    keep = [line.strip() for line in text.splitlines()
            if line.strip().startswith(("ERROR:", "The user requested")) or " depends on " in line]
    return " | ".join(keep or [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()])


def resolve(folder: Path, what: list[str], pip: Path | None = None, timeout: float = 600) -> dict:
    """pip's report of ``pip install <what>``, installing nothing (``what``: ``-e .[gpu]`` to make
    the lock; ``-r gpu.txt`` to check it). ``pip``: a wheel from :func:`fetch_pip`."""
    pip = pip or fetch_pip(folder)
    report = folder / "report.json"
    report.unlink(missing_ok=True)
    argv = [sys.executable, str(pip / "pip"), "install", "--dry-run", "--ignore-installed",
            "--use-feature=fast-deps", "--retries", "1", "--report", str(report), *what]
    # the cache beside pip's wheel: resolves that share a wheel share the index pages they fetched
    done = subprocess.run(argv, cwd=REPO, env={**pip_env(), "PIP_CACHE_DIR": str(pip.parent / "cache")},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if done.returncode != 0:  # pip explains a conflict on stdout, at its default verbosity
        raise LockError(f"pip install --dry-run {' '.join(what)} failed: {_tail(done.stdout)}")
    return json.loads(report.read_text(encoding="utf-8"))


def check(folder: Path, lock: Path = LOCK, pip: Path | None = None) -> list[str]:
    """Everything wrong with a lock: its form, setup.cfg's ranges, and a resolve of exactly its
    pins (``-r``: the project's own requirements are the ranges above, and leaving the
    editable build out saves a build environment)."""
    pins = parse_lock(lock.read_text(encoding="utf-8"), str(lock))
    problems = range_problems(pins, setup_requirements())
    return problems + report_problems(pins, resolve(folder, ["--requirement", str(lock)], pip))


def lock_text(report: dict, date: str) -> str:
    pins = resolved(report)
    header = HEADER.format(pip=PIP, date=date, count=len(pins), **{k: pins[k] for k in KEY})
    return header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check gpu.txt instead of rewriting it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-lock-") as tmp:
        try:
            if args.check:
                problems = check(Path(tmp))
                for p in problems:
                    print(f"error: {LOCK.name}: {p}", file=sys.stderr)
                if problems:
                    return 1
                print(f"{LOCK.name}: every pin resolves as locked")
                return 0
            import datetime

            text = lock_text(resolve(Path(tmp), ["--editable", ".[gpu]"]), datetime.date.today().isoformat())
        except LockError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    tmp_lock = LOCK.with_name(LOCK.name + ".tmp")
    tmp_lock.write_text(text, encoding="utf-8")
    os.replace(tmp_lock, LOCK)
    print(f"wrote {LOCK} ({len(parse_lock(text))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
