"""What every process of a run sets up once it has its config, and the CPUs it may use.

The login-node commands (submit, prefetch) and the job processes (servers, orchestrator,
trainer, eval) call :func:`apply_process_settings` before they write anything.
"""

from __future__ import annotations

import logging
import os

# Parameters below which a CPU process computes with one thread (see one_thread_if_small).
SMALL_MODEL = 100_000_000


def umask_bits(text: str) -> int:
    """``run.umask`` as a number: 3 or 4 octal digits that keep the owner's access and mask
    the group's and the world's write bits. ValueError says why not (YAML reads an unquoted
    0027 as 23). Group write is refused: a group member who can write the run dir can replace
    ``run.yaml`` or submitit's job pickle and run code as the run's owner (docs/security.md)."""
    if not (isinstance(text, str) and 3 <= len(text) <= 4 and all(c in "01234567" for c in text)):
        raise ValueError(f"must be 3 or 4 octal digits in quotes, e.g. \"0027\" or \"0022\", got {text!r}")
    bits = int(text, 8)
    if bits & 0o700:
        raise ValueError(f"({text}) must not mask the owner's own permissions")
    if not bits & 0o002:
        raise ValueError(f"({text}) must mask the world-write bit (files would be world-writable)")
    if not bits & 0o020:
        raise ValueError(f"({text}) must mask the group-write bit: a group member who can write the run could run "
                         "code as you (docs/security.md); \"0027\" or \"0022\" share it read-only")
    return bits


def current_umask() -> int:
    """The process's umask, read from /proc where Linux has it (no window with another umask),
    else swapped out and back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def run_umask(configured: int, current: int) -> int:
    """The umask a run's processes use: the bits of both, so the run's config only ever
    tightens the umask the user runs with, never loosens it."""
    return current | configured


def apply_process_settings(cfg, *, job: bool = True) -> None:
    """What every entry point does once it has its config, before it writes anything: tighten
    the umask by ``run.umask`` (:func:`run_umask`: a stricter umask of the user's stays), and in
    a job process (``job``: not the login-node commands submit and prefetch) with
    ``run.hub_offline`` set ``HF_HUB_OFFLINE=1`` for itself and its children, so nothing reaches
    for the Hub (``deepscaler/prefetch.py``), and the log level (``log.level``)."""
    os.umask(run_umask(umask_bits(cfg.run.umask), current_umask()))
    # Our loggers only (deepscaler.*): debug from torch, DeepSpeed or urllib3 would drown them.
    logging.getLogger("deepscaler").setLevel(cfg.log.level.upper())
    if job and cfg.run.hub_offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, and no more than Slurm allocated to the
    task (``SLURM_CPUS_PER_TASK``, which srun sets from the step's ``--cpus-per-task``): a
    cluster without CPU binding (task/none) does not shrink the mask. Sizes the reward pool."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, min(cpus, int(slurm)) if slurm.isdigit() else cpus)


def one_thread_if_small(model, device) -> None:
    """Compute with one CPU thread when ``model`` is small and ``device`` is the CPU, unless
    ``OMP_NUM_THREADS`` says otherwise. A small model's matmuls are too small to split, and
    threads that wait for a core another process holds cost far more than they give: on this
    project's 2-core machine two threads made sampling 3-10x slower, and a tiny trainer step
    beside a second stage 30x slower (0.15 s alone, about 5 s)."""
    import torch

    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
            torch.set_num_threads(1)


GPUS_ENV = "DEEPSCALER_GPUS"  # the node's GPUs one process of a shared step uses (deepscaler.slurm.shared_task)


def visible_gpus() -> str:
    """The node's GPUs this process uses: its own in a shared step (:data:`GPUS_ENV`), else those
    Slurm gave its job step (``SLURM_STEP_GPUS``), else those CUDA may use
    (``CUDA_VISIBLE_DEVICES``), else "none". Each process logs it at start, so the logs show
    the disjoint GPU sets of a colocated stage's steps, and the GPU a shared stage's server
    and trainer rank have in common."""
    return (os.environ.get(GPUS_ENV) or os.environ.get("SLURM_STEP_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
            or "none")
