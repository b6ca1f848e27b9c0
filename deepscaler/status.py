"""``python -m deepscaler.status``: the run's Slurm jobs beside its training progress.

    python -m deepscaler.status [--output-dir outputs] [--run NAME] [--watch [SECONDS]]

Jobs come from the ids recorded in each stage's ``metrics.jsonl`` at submit time, read with
``sacct`` (state, elapsed, nodes) and ``squeue`` (the pending reason); progress comes from the
same file (step, reward, length, truncation) and the newest stable weights step. Works on a
login node, in a job and without a terminal (plain text, reprinted every ``--watch`` seconds).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deepscaler.progress import sampled_rows
from deepscaler.store import RunStore

JOB_FIELDS = ("JobID", "JobName", "State", "Elapsed", "NNodes", "NodeList")


def find_stages(output_dir: Path, run: str | None) -> list[RunStore]:
    """Every ``<run>/stage<K>`` with a run.yaml under ``output_dir`` (one run, or all)."""
    stores = []
    for run_yaml in sorted(Path(output_dir).glob(f"{run or '*'}/stage*/run.yaml")):
        stage_dir = run_yaml.parent
        try:
            stores.append(RunStore(output_dir, stage_dir.parent.name, int(stage_dir.name.removeprefix("stage"))))
        except ValueError:
            continue
    return stores


def job_ids(store: RunStore) -> list[str]:
    """Slurm job ids submitted for this stage, oldest first."""
    ids = []
    for r in store.read_metrics().records:
        jid = r.get("slurm_job_id")
        if r.get("event") == "submitted" and jid and str(jid) not in ids:
            ids.append(str(jid))
    return ids


def slurm_jobs(ids: list[str]) -> dict[str, dict]:
    """{job id: {State, Elapsed, NNodes, NodeList, Reason}} from sacct and squeue ({} without Slurm)."""
    if not ids or shutil.which("sacct") is None:
        return {}
    from deepscaler.slurm.jobs import HetInfoWatcher

    out = subprocess.run(["sacct", "-P", "-o", ",".join(JOB_FIELDS), *[a for i in ids for a in ("-j", i)]],
                         capture_output=True, text=True)
    info = HetInfoWatcher().read_info(out.stdout) if out.returncode == 0 else {}
    jobs = {i: dict(info.get(i, {"State": "UNKNOWN"})) for i in ids}
    if shutil.which("squeue"):
        q = subprocess.run(["squeue", "-h", "-o", "%A|%r", "-j", ",".join(ids)], capture_output=True, text=True)
        for row in q.stdout.splitlines():
            jid, _, reason = row.partition("|")
            for i in ids:
                if jid.split("+")[0] == i and reason and reason != "None":
                    jobs[i]["Reason"] = reason
    return jobs


def stage_summary(store: RunStore) -> dict:
    """Progress of one stage: steps done, latest figures, the newest weights, an ETA."""
    from deepscaler.config import load_config

    rows = sampled_rows(store.read_metrics().records)  # numbers only: a null shows as '-'
    try:
        max_steps = load_config(store.run_yaml).run.max_steps
    except Exception:  # a status view must not fail on one bad stage
        max_steps = None
    recent = rows[-10:]
    rewards = [r["reward_mean"] for r in recent if "reward_mean" in r]
    times = [r["time_step_s"] for r in recent if r.get("time_step_s")]
    done = len(rows)
    eta = (max_steps - done) * sum(times) / len(times) if max_steps and times and done < max_steps else None
    last = rows[-1] if rows else {}
    return {
        "stage": store.stage, "steps": done, "max_steps": max_steps,
        "reward": sum(rewards) / len(rewards) if rewards else None,
        "length": last.get("response_length_mean"), "truncation": last.get("truncation_rate"),
        "mismatch_kl": last.get("mismatch_kl"),
        "weights": store.latest_stable("weights"), "checkpoint": store.latest_stable("checkpoints"), "eta_s": eta,
    }


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h, m = divmod(int(seconds) // 60, 60)
    return f"{h}h{m:02d}m"


def nodes_or_reason(job: dict) -> str:
    """Where a job runs, or why it waits: sacct says ``None assigned`` for each pending component
    (``HetInfoWatcher`` joins them with commas), which tells nothing; squeue's reason does."""
    nodes = ",".join(n for n in job.get("NodeList", "").split(",") if n and n != "None assigned")
    reason = job.get("Reason")
    return nodes or (f"({reason})" if reason else "-")


PROGRESS_COLUMNS = ("stage", "steps", "reward", "length", "trunc", "mismatch KL", "weights", "ckpt", "ETA")
JOB_COLUMNS = ("stage", "job", "state", "elapsed", "nodes (or why pending)")
LEGEND = ("reward: mean of the last 10 steps; length, trunc(ated), mismatch KL: the newest step's; "
          "weights, ckpt: the newest stable step; ETA at the last 10 steps' pace")


def _table(title: str, columns: tuple[str, ...], fold_last: bool = False):
    """A table that fits 80 columns whole, piped or not: no side borders, two spaces between
    columns, cells short by construction; only a ``fold_last`` column may wrap (folded onto a
    second line, never cut with '…')."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False,
                  show_edge=False)
    for i, col in enumerate(columns):
        wraps = fold_last and i == len(columns) - 1
        table.add_column(col, justify="left" if wraps else "right", no_wrap=not wraps, overflow="fold")
    return table


def render(stores: list[RunStore]):
    """One block per run: its stages' progress, then its Slurm jobs (when it has any)."""
    from itertools import groupby

    from rich.console import Group

    blocks = []
    for run, run_stores in groupby(stores, key=lambda st: st.run):
        progress = _table(f"run {run}: training progress", PROGRESS_COLUMNS)
        jobs = _table(f"run {run}: slurm jobs", JOB_COLUMNS, fold_last=True)
        for store in run_stores:
            s = stage_summary(store)
            steps = f"{s['steps']}/{s['max_steps']}" if s["max_steps"] else str(s["steps"])
            progress.add_row(str(store.stage), steps, _fmt(s["reward"], "{:.3f}"), _fmt(s["length"], "{:.0f}"),
                             _fmt(s["truncation"], "{:.1%}"), _fmt(s["mismatch_kl"], "{:.2e}"),
                             _fmt(s["weights"], "{}"), _fmt(s["checkpoint"], "{}"), _duration(s["eta_s"]))
            for jid, job in slurm_jobs(job_ids(store)).items():
                jobs.add_row(str(store.stage), jid, job.get("State", "?"), job.get("Elapsed", "-"),
                             nodes_or_reason(job))
        blocks += [progress, *([jobs] if jobs.row_count else []), ""]
    notes = [n for n in map(wandb_note, stores) if n]
    return Group(*blocks, LEGEND, *notes)


def wandb_note(store: RunStore) -> str | None:
    """The ``wandb sync`` command of a stage that logs to an offline W&B run."""
    from deepscaler.config import load_config
    from deepscaler.tracking import offline_note

    try:
        return offline_note(load_config(store.run_yaml))
    except Exception:  # a status view must not fail on one bad stage
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepscaler.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs", help="where runs are written (run.output_dir)")
    p.add_argument("--run", help="one run name (default: every run in the output dir)")
    p.add_argument("--watch", nargs="?", const=30.0, type=float, metavar="SECONDS", help="refresh every N s (30)")
    args = p.parse_args(argv)
    from rich.console import Console

    console = Console()
    while True:
        stores = find_stages(Path(args.output_dir), args.run)
        if not stores:
            print(f"error: no run in {args.output_dir}" + (f" named '{args.run}'" if args.run else "")
                  + " (a stage directory holds run.yaml once submitted)", file=sys.stderr)
            return 2
        if args.watch and console.is_terminal:
            console.clear()
        console.print(render(stores))
        if not args.watch:
            return 0
        print(time.strftime("updated %H:%M:%S"), flush=True)
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
