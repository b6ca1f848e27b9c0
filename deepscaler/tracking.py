"""Experiment tracking with Weights & Biases: one writer per stage, fed by ``metrics.jsonl``.

    python -m deepscaler.tracking --config RUN/stageK/run.yaml     (started by the supervisor)

``metrics.jsonl`` stays the source of truth; W&B is a view of it. The stage's supervisor
(``deepscaler.launch``, in the Slurm job or on this machine) runs this forwarder beside the
other processes when ``wandb.project`` is set. It follows the file from where it left off and
logs each trainer and orchestrator record as ``trainer/<key>`` and ``orchestrator/<key>`` on
one step axis, ``step``: the rollout step, as ``deepscaler.status`` shows it (the trainer's
record of the update on the rollouts of step N is numbered N+1 in the file).

``<stage>/wandb/state.json`` keeps the W&B run id, so a requeue, a ``--resume-step`` or a
restarted forwarder continues the same W&B run. Where to continue comes from W&B itself, not
from what was sent: a killed forwarder loses what W&B had not yet written. So the newest step
of each source that W&B has (the ``<source>/step`` series: the resumed run's summary online,
the ``.wandb`` files offline) is read back, and the file is forwarded from the record after
it. A step that a resumed stage computes again is not logged twice: W&B keeps the first.
Offline runs (compute nodes without internet) are written under ``<stage>/wandb/``; ``wandb
sync`` uploads them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import shlex
import signal
import sys
import threading
import uuid
from pathlib import Path

from deepscaler.config import Config, ConfigError, load_config_args, parse_command_line, process_parser
from deepscaler.process import apply_process_settings
from deepscaler.progress import MetricsTail
from deepscaler.store import RunStore, atomic_write_json, read_json
from deepscaler.wandb_offline import history

log = logging.getLogger("deepscaler.tracking")

STATE = "state.json"
POLL_S = 2.0

# What each logged key means (docs/monitoring.md is generated from this; a test checks that every
# number a stage records is here). Keys are logged as <source>/<key>.
KEYS = {
    "orchestrator": {
        "step": "the rollout step (the x axis; also how a restarted forwarder finds where W&B stands)",
        "reward_mean": "mean reward of the step's samples (1 correct, 0 otherwise)",
        "solve_all": "fraction of the step's prompts whose samples were all correct",
        "solve_none": "fraction of the step's prompts with no correct sample",
        "response_length_mean": "mean response length in tokens",
        "response_length_max": "longest response in tokens",
        "truncation_rate": "fraction of responses cut at sampling.max_response_tokens",
        "weight_step": "the oldest weights step that sampled this step",
        "weights_loaded": "the weights step the servers hold after this step's update",
        "time_weights_s": "seconds waiting for and loading weights",
        "time_sample_s": "seconds sampling",
        "time_score_s": "seconds scoring (math-verify)",
        "time_step_s": "seconds for the whole step",
    },
    "trainer": {
        "step": "the rollout step trained on (the x axis)",
        "pg_loss": "policy-gradient loss, mean over the step's updates",
        "kl": "KL to the reference policy (the stage's starting model), mean over updates",
        "entropy": "mean token entropy of the policy",
        "clip_fraction": "fraction of tokens whose ratio was clipped, over all updates",
        "first_update_ratio_mean": "mean ratio of the step's first update (exactly 1 with old_logprobs: trainer)",
        "first_update_clip_fraction": "clipped fraction of the first update (0 with old_logprobs: trainer)",
        "mismatch_kl": "KL between the sampler's and the trainer's log-probs of the sampled tokens",
        "mismatch_max": "largest per-token |log-prob difference| between sampler and trainer",
        "tis_weight_mean": "mean truncated importance weight (old_logprobs: trainer with tis_cap)",
        "tis_clipped_fraction": "fraction of tokens whose importance weight was capped",
        "grad_norm": "gradient norm before clipping",
        "lr": "learning rate",
        "weight_step": "the weights step that sampled the rollouts trained on",
        "tokens": "tokens trained on in the step",
        "tokens_per_s": "training throughput",
        "time_wait_s": "seconds waiting for rollouts",
        "time_train_s": "seconds training",
        "time_step_s": "seconds for the whole step",
    },
}


def enabled(cfg: Config) -> bool:
    return bool(cfg.wandb.project) and cfg.wandb.mode != "disabled"


def require_package(cfg: Config) -> None:
    """A project set without the package installed: say so before anything is submitted."""
    if enabled(cfg) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"wandb.project is '{cfg.wandb.project}' but the wandb package is not installed: "
                          "pip install -e \".[wandb]\", or unset wandb.project")


def run_name(cfg: Config) -> str:
    return cfg.wandb.name or f"{cfg.run.name}-stage{cfg.run.stage}"


def group(cfg: Config) -> str:
    return cfg.wandb.group or cfg.run.name


def sync_command(store: RunStore) -> str:
    """Uploads the stage's offline runs (one folder per attempt, all of the same W&B run)."""
    return f"wandb sync {shlex.quote(str(store.wandb_dir / 'wandb'))}/offline-run-*"


def point(record: dict) -> tuple[str, int, dict] | None:
    """(source, step on the shared axis, {source/key: number}) of a step record; None for events
    and other sources. Only finite numbers: W&B charts nothing else."""
    source, step = record.get("source"), record.get("step")
    if source not in KEYS or "event" in record or not isinstance(step, int) or isinstance(step, bool):
        return None
    step = step - 1 if source == "trainer" else step
    values = {f"{source}/{k}": v for k, v in record.items()
              if k not in ("source", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)}
    return source, step, {**values, f"{source}/step": step}


class Forwarder:
    """Follows ``metrics.jsonl`` into one W&B run (see the module docstring)."""

    def __init__(self, cfg: Config, store: RunStore):
        self.cfg, self.store = cfg, store
        self.state_path = store.wandb_dir / STATE
        self.tail = MetricsTail(store)  # from the start: which records W&B lacks is decided per step
        self.last: dict[str, int] = {}  # source -> newest step W&B has
        self.run = None

    def start(self) -> None:
        import wandb

        self.store.wandb_dir.mkdir(parents=True, exist_ok=True)
        new = not self.state_path.exists()
        run_id = uuid.uuid4().hex[:8] if new else read_json(self.state_path)["run_id"]
        w = self.cfg.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, name=run_name(self.cfg), group=group(self.cfg),
                              tags=list(w.tags) or None, mode=w.mode, id=run_id, resume="allow",
                              dir=str(self.store.wandb_dir), config=dataclasses.asdict(self.cfg) if new else None)
        self.run.define_metric("step")
        for source in KEYS:
            self.run.define_metric(f"{source}/*", step_metric="step")
        atomic_write_json(self.state_path, {"run_id": run_id})  # before the first record
        self.last = self.persisted(run_id)
        log.info("W&B run %s (%s, project %s, group %s)%s", run_id, w.mode, w.project, group(self.cfg),
                 "".join(f"; W&B has {s} up to step {n}" for s, n in sorted(self.last.items())))

    def persisted(self, run_id: str) -> dict[str, int]:
        """The newest step of each source that W&B holds for this run."""
        if self.cfg.wandb.mode == "offline":
            rows = history(self.store.wandb_dir / "wandb", run_id)
        else:
            rows = [dict(self.run.summary)]  # a resumed online run's summary: the last value of each key
        last: dict[str, int] = {}
        for row in rows:
            for source in KEYS:
                step = row.get(f"{source}/step")
                if isinstance(step, (int, float)):
                    last[source] = max(last.get(source, -1), int(step))
        return last

    def forward(self) -> int:
        """Log what was appended since the last call; returns the number of records logged."""
        logged = 0
        for record in self.tail.poll():
            p = point(record)
            if p is None:
                continue
            source, step, values = p
            if step <= self.last.get(source, -1):
                continue  # W&B has it (sent before a restart, or a step a resumed stage computed again)
            self.run.log({**values, "step": step})
            self.last[source] = step
            logged += 1
        return logged

    def finish(self) -> None:
        import wandb

        self.forward()
        self.run.finish()
        wandb.teardown()  # finish() may return before W&B's service has written the run's file
        if self.cfg.wandb.mode == "offline":
            log.info("offline W&B run; upload it with: %s", sync_command(self.store))


def follow(cfg: Config, stop: threading.Event) -> None:
    """Forward until ``stop`` is set (SIGTERM from the supervisor when the stage ends), then the rest."""
    fwd = Forwarder(cfg, RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage))
    fwd.start()
    while not stop.wait(POLL_S):
        fwd.forward()
    fwd.finish()


def log_report(cfg: Config, store: RunStore, results: dict, png: Path) -> str | None:
    """The eval report (``deepscaler.eval report``) as a W&B run of its own in the run's group:
    a table with one row per model/step and benchmark, and ``eval.png``. Returns a line saying
    where it went, or None when tracking is off."""
    if not enabled(cfg):
        return None
    require_package(cfg)
    import wandb

    rows = [[str(what), bench, s.get("avg_at_n"), s.get("length_mean"), s.get("samples_per_problem")]
            for what, per in results.items() for bench, s in per.items()]
    w = cfg.wandb
    store.wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=w.project, entity=w.entity, name=f"{run_name(cfg)}-eval", group=group(cfg),
                     job_type="eval", tags=list(w.tags) or None, mode=w.mode, dir=str(store.wandb_dir))
    run.log({"eval/results": wandb.Table(columns=["model", "benchmark", "accuracy", "length_mean", "samples"],
                                         data=rows),
             "eval/plot": wandb.Image(str(png))})
    run.finish()
    wandb.teardown()  # finish() may return before W&B's service has written the run's file
    where = f"W&B run {run.id} in group {group(cfg)} ({w.mode})"
    return where + (f"; upload it with: {sync_command(store)}" if w.mode == "offline" else "")


def offline_note(cfg: Config) -> str | None:
    """The line a stage's end message and ``deepscaler.status`` print for an offline W&B run."""
    if not enabled(cfg) or cfg.wandb.mode != "offline":
        return None
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    return f"W&B run {run_name(cfg)} is offline; upload it from a node with internet: {sync_command(store)}"


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("python -m deepscaler.tracking", __doc__)
    args = parse_command_line(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tracking %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        cfg = load_config_args(args.config, args.overrides)
        apply_process_settings(cfg)
        require_package(cfg)
        follow(cfg, stop)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

