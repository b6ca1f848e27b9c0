"""Resources as Slurm options, and the batch script: the one place where either is spelled.

A :class:`Request` is what one job, or one component of a heterogeneous job, asks for on each
of its nodes; ``slurm.*`` (partition, account, time, extra lines, set-up) is the site's part.
Both the stage job (``stage_job.py``, our own script) and the eval array (submitit's script,
through :func:`submitit_parameters`) take their options from here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

SITE_KEYS = ("partition", "account", "qos", "constraint")
# Config values that reach a batch script (ours or submitit's), as "section.key" of the config;
# "[]" marks a list. A newline in any of them would end its #SBATCH line and start a shell line.
SCRIPT_KEYS = ("run.output_dir", "run.name", "slurm.time", *(f"slurm.{k}" for k in SITE_KEYS), "slurm.extra_sbatch[]",
               "slurm.setup[]", "slurm.inference.mem", "slurm.trainer.mem", "eval.resources.mem")


def quote(value: object) -> str:
    return shlex.quote(str(value))


def control_character_keys(cfg) -> list[str]:
    """The SCRIPT_KEYS whose value holds a control character (a newline, a tab, ...): config
    validation refuses them, since no Slurm value needs one (``slurm.setup`` lines are shell,
    but one line each)."""
    bad = []
    for key in SCRIPT_KEYS:
        value = cfg
        for part in key.removesuffix("[]").split("."):
            value = getattr(value, part)
        values = value if key.endswith("[]") else [value]
        if any(isinstance(v, str) and any(ord(c) < 32 or ord(c) == 127 for c in v) for v in values):
            bad.append(key.removesuffix("[]"))
    return bad


@dataclass(frozen=True)
class Request:
    """What a job (or a hetjob component) asks for, per node."""

    nodes: int
    ntasks_per_node: int
    cpus_per_task: int
    gpus_per_node: int = 0
    mem: str | None = None


# --------------------------------------------------------------------------- time strings


def valid_time(text: str) -> bool:
    """Slurm's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, dash, rest = text.partition("-")
    if dash:
        if not days.isdigit() or not rest:
            return False
        parts = rest.split(":")
        return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)
    parts = text.split(":")
    return 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)


def time_minutes(text: str) -> int:
    """A Slurm time string in whole minutes (rounded up), e.g. for submitit's timeout_min."""
    return -(-time_seconds(text) // 60)


def time_seconds(text: str) -> int:
    """A Slurm time string (already validated) in seconds."""
    days, dash, rest = text.partition("-")
    if not dash:
        days, rest = "0", text
    parts = [int(p) for p in rest.split(":")]
    if dash:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # M
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # M:S
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return ((int(days) * 24 + h) * 60 + m) * 60 + s


# --------------------------------------------------------------------------- options


def _site(s) -> dict[str, str]:
    """``slurm.partition`` etc. that are set (``s``: the config's ``slurm`` section)."""
    return {key: getattr(s, key) for key in SITE_KEYS if getattr(s, key)}


def request_lines(s, req: Request) -> list[str]:
    """The sbatch options of one job or hetjob component."""
    lines = [f"--nodes={req.nodes}", f"--ntasks-per-node={req.ntasks_per_node}",
             f"--cpus-per-task={req.cpus_per_task}", f"--time={s.time}"]
    if req.gpus_per_node:
        lines.append(f"--gpus-per-node={req.gpus_per_node}")
    if req.mem:
        lines.append(f"--mem={quote(req.mem)}")
    return lines + [f"--{key}={quote(value)}" for key, value in _site(s).items()]


def submitit_parameters(s, req: Request, *, name: str, parallelism: int | None = None) -> dict[str, object]:
    """The same options as submitit's SlurmExecutor parameters (for scripts submitit renders:
    the eval array). The batch shell gets USR2 ``slurm.signal_delay_s`` before the limit."""
    params: dict[str, object] = {
        "job_name": name, "time": time_minutes(s.time), "nodes": req.nodes, "ntasks_per_node": req.ntasks_per_node,
        "cpus_per_task": req.cpus_per_task, "signal_delay_s": s.signal_delay_s, **_site(s),
    }
    if req.gpus_per_node:
        params["gpus_per_node"] = req.gpus_per_node
    if req.mem:
        params["mem"] = req.mem
    if parallelism:
        params["array_parallelism"] = parallelism
    if s.setup:
        params["setup"] = list(s.setup)
    extra = {}
    for line in s.extra_sbatch:  # "--exclusive", "--mail-type=END"
        key, sep, value = line.strip().lstrip("-").partition("=")
        extra[key] = value if sep else True
    if extra:
        params["additional_parameters"] = extra
    return params


def script(s, requests: list[Request], *, name: str, folder: Path, command: str, comment: str,
           dependency: str | None = None) -> str:
    """A batch script: one ``#SBATCH hetjob`` block per request after the first, then the
    site's set-up lines and ``exec command`` (submitit's job runner). The batch shell gets
    USR2 ``slurm.signal_delay_s`` before the time limit (it checkpoints and requeues), and
    ``--requeue`` lets Slurm requeue after a node failure too."""
    out = Path(folder)
    head = [
        f"--job-name={quote(name)}",
        f"--output={quote(out / '%j_0_log.out')}",
        f"--error={quote(out / '%j_0_log.err')}",
        "--open-mode=append",
        f"--signal=B:USR2@{s.signal_delay_s}",
        "--requeue",
    ]
    if dependency:
        head.append(f"--dependency={quote(dependency)}")
    head += [line.strip() for line in s.extra_sbatch]
    lines = ["#!/bin/bash", f"# {name}: {comment}"]
    for i, req in enumerate(requests):
        if i:
            lines.append("#SBATCH hetjob")
        lines += [f"#SBATCH {x}" for x in (head if i == 0 else []) + request_lines(s, req)]
    lines += ["", "# environment set-up (slurm.setup)"] + list(s.setup)
    lines += ["", "export SUBMITIT_EXECUTOR=slurm", f"exec {command}", ""]
    return "\n".join(lines)
