"""Where a stage starts: its first step, the checkpoint a restart resumes from, and the
data progress saved with it.

Why one module: the trainer and the orchestrator are separate processes (on separate nodes
under Slurm) that must agree on these answers without talking to each other. Both derive
them from the same files, with the same rules, here.
"""

from __future__ import annotations

import logging

from deepscaler.config import Config, ConfigError
from deepscaler.store import RunStore, StepCorrupt, StoreError, read_json

log = logging.getLogger("deepscaler.stage")

TRAINER_STATE = "trainer_state.json"  # written into checkpoints/step_N by trainer.checkpoint


def parse_resume_step(resume: str | None) -> int | str | None:
    """``--resume-step`` as written -> None, ``"latest"`` or a step number (0 or more).

    Why apart from :func:`resolve_resume`: submit checks the syntax before anything else, also
    for ``--dry-run``; only ASCII digits count (``int()`` would take ``-1``, ``+2``, ``1_0``).
    """
    if resume is None or resume == "latest":
        return resume
    text = str(resume).strip()
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"--resume-step '{resume}': expected a step number (0 or more) or 'latest'")
    return int(text)


def resolve_resume(store: RunStore, resume: str | None, checksums: bool = False) -> int | None:
    """``--resume-step N|latest`` -> a stable checkpoint step, or None for a fresh start.

    A fresh start over existing checkpoints is refused: rerunning a command by mistake must
    not silently restart (and overwrite) a run that has progress. ``checksums``: ``latest``
    also reads every file of a candidate against its recorded CRC32 (the supervisor's one
    decision, ``deepscaler.launch.restart_point``; seconds for a 7 GB checkpoint).
    """
    resume = parse_resume_step(resume)
    steps = store.stable_steps("checkpoints")
    if resume is None:
        if steps:
            raise ConfigError(f"{store.checkpoints_dir} already holds checkpoints (stable: "
                              f"{', '.join(map(str, steps))}); pass --resume-step latest to continue, "
                              f"or choose another run.name")
        return None
    if resume == "latest":
        # The newest checkpoint whose files still match their manifest: a damaged one (a
        # truncated file, a partial copy, a changed byte) is skipped, never resumed from.
        for step in reversed(steps):
            try:
                store.verify_step("checkpoints", step, checksums=checksums)
                return step
            except StepCorrupt as e:
                log.warning("skipping a damaged checkpoint: %s", e)
        return None
    step = resume
    if step not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise ConfigError(f"--resume-step {step}: no stable checkpoint {store.step_path('checkpoints', step)} "
                          f"(stable: {have})")
    return step


def previous_stage_checkpoint(cfg: Config, store: RunStore) -> tuple[RunStore, int] | None:
    """(store of stage K-1, its newest stable checkpoint step) when this stage starts from the
    previous one (``checkpoint.init_from_stage``), else None. No copying by hand: stage K+1
    reads stage K's directory of the same run."""
    k = cfg.checkpoint.init_from_stage
    if k is None:
        return None
    prev = store.for_stage(k)
    step = prev.latest_stable("checkpoints")
    if step is None:
        raise StoreError(f"{prev.checkpoints_dir}: stage {k} has no stable checkpoint for stage "
                         f"{cfg.run.stage} to start from (run stage {k} first, or unset checkpoint.init_from_stage)")
    return prev, step


def checkpoint_state(store: RunStore, step: int) -> dict:
    """``trainer_state.json`` of a stable checkpoint: step, progress (stage_first_step, data)."""
    return read_json(store.step_dir("checkpoints", step) / TRAINER_STATE)


def first_step(cfg: Config, store: RunStore) -> int:
    """The step number a fresh start of this stage begins at: 0, or the previous stage's last
    step when steps continue across stages (``checkpoint.reset_step: false``, as the paper's
    plots count 0-1040-1520-1750)."""
    prev = previous_stage_checkpoint(cfg, store)
    if prev is None or cfg.checkpoint.reset_step:
        return 0
    return prev[1]
