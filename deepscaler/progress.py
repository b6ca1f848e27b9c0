"""Training progress as people read it: one row per step, joined from ``metrics.jsonl``.

The orchestrator writes a record for the rollouts of step N (reward, lengths, truncation);
the trainer writes one for the update those rollouts fed (loss, KL, entropy), numbered N+1
after the weights it published. :func:`step_rows` joins them, and both the launcher's live
display and ``python -m deepscaler.status`` show those rows.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Iterable

from deepscaler.config import Config
from deepscaler.store import RunStore

COLUMNS = (  # (title, key, format)
    ("step", "step", "{:d}"),
    ("reward", "reward_mean", "{:.3f}"),
    ("all ok", "solve_all", "{:.2f}"),
    ("none ok", "solve_none", "{:.2f}"),
    ("len mean", "response_length_mean", "{:.0f}"),
    ("len max", "response_length_max", "{:d}"),
    ("trunc", "truncation_rate", "{:.1%}"),
    ("loss", "pg_loss", "{:+.4f}"),
    ("kl", "kl", "{:.2e}"),
    ("entropy", "entropy", "{:.3f}"),
    ("step s", "time_step_s", "{:.1f}"),
)


# What a progress row takes from the trainer's record of the step.
TRAINER_KEYS = ("pg_loss", "kl", "entropy", "grad_norm", "tokens_per_s", "mismatch_kl", "first_update_clip_fraction")


def number(value: object) -> int | float | None:
    """``value`` when it is a number (not a bool), else None.

    Why: metrics.jsonl is a plain file that a user's tool or a crashed writer may have put a
    null or a string into; every reader shows such a value as '-' instead of raising."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def step_rows(records: Iterable[dict]) -> list[dict]:
    """{step, orchestrator numbers..., trainer numbers...} per rollout step, oldest first.

    A restarted run writes some steps twice; the newest record of each step wins. Only numbers
    are taken (a null or a string is left out, so it shows as '-'); ``sample_s`` / ``train_s``
    are present once that side's record of the step is (None when its time is unreadable). The
    step time is the slower of the two sides (they overlap when sampling runs ahead)."""
    rows: dict[int, dict] = {}
    for r in records:
        step = r.get("step")
        if "event" in r or not isinstance(step, int) or isinstance(step, bool):
            continue
        if r.get("source") == "orchestrator":
            values = {k: v for k, v in r.items() if k not in ("source", "time_step_s") and number(v) is not None}
            row = rows.setdefault(step, {"step": step})
            row.update(values, sample_s=number(r.get("time_step_s")))
        elif r.get("source") == "trainer":
            step -= 1  # trained on the rollouts of step N, published weights N+1
            values = {k: r[k] for k in TRAINER_KEYS if number(r.get(k)) is not None}
            rows.setdefault(step, {"step": step}).update(values, train_s=number(r.get("time_step_s")))
    for row in rows.values():
        times = [t for t in (row.get("sample_s"), row.get("train_s")) if t is not None and math.isfinite(t)]
        row["time_step_s"] = max(times) if times else None
    return [rows[k] for k in sorted(rows)]


def sampled_rows(records: Iterable[dict]) -> list[dict]:
    """The :func:`step_rows` whose rollouts were recorded: the steps a stage has done."""
    return [r for r in step_rows(records) if "sample_s" in r]


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def line(row: dict) -> str:
    """A plain log line for one row."""
    return "  ".join(f"{title} {cell(row, key, fmt)}" for title, key, fmt in COLUMNS)


def table(rows: list[dict], title: str | None = None, last: int | None = None):
    """A rich Table of the rows (the newest ``last`` of them)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for name, _, _ in COLUMNS:
        t.add_column(name, justify="right")
    for row in rows[-last:] if last else rows:
        t.add_row(*(cell(row, key, fmt) for _, key, fmt in COLUMNS))
    return t


@dataclass
class MetricsTail:
    """New complete lines of metrics.jsonl since the last call (the file only grows)."""

    store: RunStore
    offset: int = 0

    @classmethod
    def from_end(cls, store: RunStore) -> "MetricsTail":
        """Only what is appended from now on (earlier attempts are not news)."""
        return cls(store, store.metrics_path.stat().st_size if store.metrics_path.exists() else 0)

    def poll(self) -> list[dict]:
        try:
            with open(self.store.metrics_path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line of a crashed writer; store.read_metrics counts those
            if isinstance(rec, dict):
                new.append(rec)
        return new


class Display:
    """Live progress of a running stage: a refreshing table on a terminal, a plain line per
    finished step otherwise (logs, CI, Slurm output files)."""

    def __init__(self, cfg: Config, stream=None):
        self.cfg = cfg
        self.stream = stream or sys.stdout
        self.records: list[dict] = []
        self.printed: set[int] = set()
        self.live = None
        self.title = (f"run '{cfg.run.name}' stage {cfg.run.stage}: {cfg.model.name}, "
                      f"{cfg.orchestrator.prompts_per_step}x{cfg.sampling.samples_per_prompt} samples, "
                      f"{cfg.run.max_steps or 'all'} steps")

    def __enter__(self) -> "Display":
        if self.stream.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(table([], self.title), console=Console(file=self.stream), refresh_per_second=2)
            self.live.__enter__()
        else:
            print(self.title, file=self.stream, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, new: list[dict]) -> None:
        if not new:
            return
        self.records += new
        rows = step_rows(self.records)
        if self.live is not None:
            self.live.update(table(rows, self.title, last=20))
            return
        for row in rows:  # a row is finished once its update has been trained
            if row["step"] not in self.printed and "train_s" in row:
                print(line(row), file=self.stream, flush=True)
                self.printed.add(row["step"])
