"""``python -m deepscaler.eval sweep``: one Slurm array job, one task per weights step.

Each task calls :func:`deepscaler.eval.run.run_eval` in-process under submitit's job runner:
the same evaluation as ``python -m deepscaler.eval run --model N ...``. What the sweep decides
on the login node:

- which steps: the stage's stable weights steps (or ``--steps``), plus ``base`` with
  ``--include-base``, minus those whose every requested benchmark already has a result
  (unless ``--force``). So a failed task is rerun alone by sweeping again, and a sweep while
  training runs picks up the steps published since the last one.
- retention: before submitting, each step gets ``evals/step_N/PENDING``; the trainer passes
  those steps to ``apply_retention(protected=...)``, and the eval removes the marker when the
  step is done. While a task evaluates, its lease on the weights folder protects it too.
- resources: ``eval.resources`` with the partition, account, QoS, time, set-up lines and extra
  sbatch lines of ``slurm``; ``--max-parallel`` (or ``eval.max_parallel``) becomes ``%N``.

Why submitit's ``map_array`` and not a template: the array, its log files and the state
polling of ``--wait`` come with it. ``--dry-run`` prints each task's command line and the
array's sbatch script; its options come from ``deepscaler/slurm/options.py``, as a training
stage's do. submitit's script runs a pickled job, so it cannot be submitted by hand:
``--emit-sbatch FILE`` writes one that can (:func:`sbatch_script`), from the same plan,
options and claims, and submits nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from deepscaler.config import Config, ConfigError
from deepscaler.data import DataError
from deepscaler.eval.report import report_to_wandb, write_report
from deepscaler.eval.run import (EvalError, EvalRequest, eval_config, is_evaluated, label, parse_benchmarks,
                                 resolve_run, run_eval)
from deepscaler.process import apply_process_settings
from deepscaler.slurm.jobs import ended, plain_array_script, wait_for_jobs
from deepscaler.slurm.options import Request, quote, submitit_parameters
from deepscaler.store import BASE_EVAL, RunStore, StoreError, atomic_write_text, private_dir

# --------------------------------------------------------------------------- the sweep's plan


def parse_steps(text: str, store: RunStore) -> list[int]:
    """``all`` -> every stable weights step; ``100,200`` -> those, each of which must be stable."""
    stable = store.stable_steps("weights")
    if text.strip() == "all":
        return stable
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise EvalError(f"--steps '{text}': expected all or step numbers such as 100,200") from None
    for step in steps:
        store.step_dir("weights", step)  # StepNotFound: one line listing the stable steps
    return steps


def task_request(store: RunStore, what: int | str, benchmarks: list[str], args: argparse.Namespace) -> EvalRequest:
    """The evaluation of one task (absolute output dir: tasks run elsewhere)."""
    return EvalRequest(model=str(what), output_dir=str(store.output_dir.resolve()), run=store.run, stage=store.stage,
                       benchmarks=",".join(benchmarks), preset=args.preset, seed=args.seed,
                       skip_existing=not args.force, overrides=tuple(args.overrides))


def request_argv(request: EvalRequest) -> list[str]:
    """The ``python -m deepscaler.eval`` command line that runs ``request`` (printed, never run)."""
    argv = ["run", "--model", request.model]
    for flag, value in (("--output-dir", request.output_dir), ("--run", request.run), ("--stage", request.stage),
                        ("--benchmarks", request.benchmarks), ("--preset", request.preset),
                        ("--seed", request.seed)):
        if value is not None:
            argv += [flag, str(value)]
    if request.skip_existing:
        argv.append("--skip-existing")
    return argv + list(request.overrides)


def task_argv(store: RunStore, what: int | str, benchmarks: list[str], args: argparse.Namespace) -> list[str]:
    """The ``deepscaler.eval`` command line equivalent to one task (what --dry-run prints)."""
    return request_argv(task_request(store, what, benchmarks, args))


@dataclass(frozen=True)
class Plan:
    """What a sweep evaluates, decided on the login node; ``--emit-sbatch`` writes the same."""

    cfg: Config
    store: RunStore
    benchmarks: list[str]
    todo: list[int | str]  # in task order: base first
    done: list[int | str]  # every requested benchmark has a result (empty with --force)
    parallel: int | None  # --max-parallel, else eval.max_parallel; None or 0: every task at once


def plan(args: argparse.Namespace) -> Plan:
    store = resolve_run(args.output_dir, args.run, args.stage)
    cfg, store, _ = eval_config("base", store.output_dir, store.run, store.stage, args.preset, args.overrides)
    benchmarks = parse_benchmarks(args.benchmarks, cfg)
    wanted: list[int | str] = parse_steps(args.steps, store)
    if args.include_base:
        wanted = [BASE_EVAL, *wanted]
    done = [w for w in wanted if not args.force and is_evaluated(store, w, benchmarks)]
    todo = [w for w in wanted if w not in done]
    if args.max_parallel is not None and args.max_parallel < 1:
        raise EvalError(f"--max-parallel {args.max_parallel}: must be 1 or more")
    return Plan(cfg, store, benchmarks, todo, done, args.max_parallel or cfg.eval.max_parallel)


def sweep(args: argparse.Namespace) -> int:
    """Plan, then submit one array (print it with --dry-run, write it as a plain script with
    --emit-sbatch); --wait polls it and writes the report."""
    p = plan(args)
    apply_process_settings(p.cfg, job=False)  # umask etc. before the markers, the logs, the script
    cfg, store, benchmarks, todo, done, parallel = p.cfg, p.store, p.benchmarks, p.todo, p.done, p.parallel
    what = ", ".join(label(w) for w in todo) or "nothing"
    print(f"# sweep of run '{store.run}' stage {store.stage} on {', '.join(benchmarks)}: {len(todo)} task(s): {what}"
          + (f"; already evaluated: {', '.join(label(w) for w in done)}" if done else ""), flush=True)
    if args.dry_run:
        print("# one array job through submitit; task i runs the i-th of these:")
        for w in todo:
            print("python -m deepscaler.eval " + shlex.join(task_argv(store, w, benchmarks, args)))
        print(array_script(executor(cfg, store, parallel or len(todo)), len(todo)), end="")
        return 0
    if not todo:
        print("nothing to evaluate: every requested step has results (--force re-evaluates)")
        return _finish(store) if args.wait else 0
    if BASE_EVAL in todo:  # its task loads model.name: check the Hub cache before sbatch (CacheError)
        from deepscaler.prefetch import require_cache

        require_cache(cfg, data=False)
    if args.emit_sbatch:
        return emit_sbatch(p, args, Path(args.emit_sbatch))
    todo, jobs = submit(cfg, store, todo, benchmarks, args, parallel)
    if not jobs:
        return 0
    if not args.wait:
        print(f"watch with: squeue -u $USER -n {job_name(store)}; then: python -m deepscaler.eval report "
              f"--output-dir {shlex.quote(str(store.output_dir))} --run {shlex.quote(store.run)} --stage {store.stage}")
        return 0
    return wait(jobs, todo, store)


def _finish(store: RunStore) -> int:
    """The report of everything evaluated so far (the sweep's aggregate step)."""
    if not store.read_evals():
        return 0
    md, png = write_report(store)
    print(f"wrote {md} and {png}")
    note = report_to_wandb(store, png)
    if note:
        print(f"logged to {note}")
    return 0


# --------------------------------------------------------------------------- on Slurm
# The array's options come from deepscaler/slurm/options.py (eval.resources and slurm.*),
# the polling from deepscaler/slurm/jobs.py, as for the training stages.


def job_name(store: RunStore) -> str:
    """``e<K>-<run>-deepscaler``: evaluation, stage and run first, apart from the stage's own
    ``s<K>-<run>-...`` in squeue's 8-character NAME column (``slurm.stage_job.job_name``)."""
    return f"e{store.stage}-{store.run}-deepscaler"


class EvalTask:
    """What each array task runs: :func:`run_eval` on the task's request; one of the one-line
    errors is printed as ``error: ...`` (as the command line does) and fails the task.
    ``checkpoint`` makes it requeueable in submitit's sense (its signal handler calls it at the
    time limit or on preemption): the requeued task gets ``skip_existing`` and keeps the
    benchmarks it finished, each being its own file."""

    def __call__(self, request: EvalRequest) -> str:
        command = shlex.join(request_argv(request))
        try:
            run_eval(request)
        except (ConfigError, DataError, StoreError, EvalError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise RuntimeError(f"python -m deepscaler.eval {command} failed: {e}") from None
        return command

    def checkpoint(self, request: EvalRequest):
        import submitit

        return submitit.helpers.DelayedSubmission(self, replace(request, skip_existing=True))


def executor(cfg: Config, store: RunStore, parallel: int | None):
    """submitit's executor for the array: one task per weights step, ``eval.resources`` each."""
    import submitit

    ex = submitit.SlurmExecutor(folder=log_folder(store), max_num_timeout=cfg.slurm.max_requeues)
    ex.update_parameters(**submitit_parameters(cfg.slurm, task_resources(cfg), name=job_name(store),
                                               parallelism=parallel))
    return ex


def task_resources(cfg: Config) -> Request:
    """One array task's resources: ``eval.resources`` (CPUs per GPU, or per task without GPUs)."""
    res = cfg.eval.resources
    return Request(res.nodes, 1, res.cpus_per_gpu * max(1, res.gpus_per_node), res.gpus_per_node, res.mem)


def log_folder(store: RunStore) -> Path:
    """The array's logs (and submitit's pickles): ``logs/slurm-eval``, absolute."""
    return (store.logs_dir / "slurm-eval").resolve()


def array_script(ex, tasks: int) -> str:
    """The sbatch script of an array of ``tasks`` tasks, as submitit writes it (--dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder, map_count=tasks, **ex.parameters)


def submit(cfg: Config, store: RunStore, todo: list[int | str], benchmarks: list[str],
           args: argparse.Namespace, parallel: int | None) -> tuple[list[int | str], list]:
    """Mark the steps PENDING (retention keeps them), then submit the array through submitit.
    Returns (what was submitted, its submitit jobs in the same order)."""
    import submitit

    private_dir(log_folder(store))  # the tasks' pickles: owner-only (docs/security.md)
    todo, marked = claim(store, todo, benchmarks)
    if not todo:
        return [], []
    ex = executor(cfg, store, parallel or len(todo))
    requests = [task_request(store, w, benchmarks, args) for w in todo]
    try:
        with submitit.helpers.clean_env():  # a sweep from inside a job must not leak SLURM_* into the array
            jobs = ex.map_array(EvalTask(), requests)
    except Exception as e:  # submitit's FailedJobError carries sbatch's own message
        for step in marked:
            store.clear_eval_pending(step)
        raise EvalError(f"sbatch refused the eval array of run '{store.run}' stage {store.stage}: "
                        f"{' '.join(str(e).split())}") from None
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted eval array {array_id} ({job_name(store)}): "
          + ", ".join(f"{job.job_id}={label(w)}" for w, job in zip(todo, jobs)) + f"; logs in {ex.folder}", flush=True)
    return todo, jobs


def claim(store: RunStore, todo: list[int | str], benchmarks: list[str]) -> tuple[list[int | str], list[int]]:
    """Mark the steps PENDING, so that retention keeps them until evaluated, and drop any step
    retention deleted before its marker landed. Returns (what is left to evaluate, the markers
    this call wrote: to remove if the submission fails)."""
    steps = [w for w in todo if w != BASE_EVAL]
    marked = [s for s in steps if s not in store.pending_evals()]
    for step in steps:
        store.mark_eval_pending(step, benchmarks)
    gone = [s for s in steps if not store.is_stable("weights", s)]  # deleted before the marker landed
    for s in gone:
        store.clear_eval_pending(s)
    if gone:
        print(f"warning: retention deleted steps {gone} before the sweep could claim them", file=sys.stderr)
    return [w for w in todo if w not in gone], marked


# --------------------------------------------------------------------------- a plain sbatch script


def sbatch_script(p: Plan, todo: list[int | str], args: argparse.Namespace) -> str:
    """``--emit-sbatch``'s script: array task i runs ``python -m deepscaler.eval run --model
    STEPS[i]`` with the arguments a sweep task gets (:func:`task_argv`), under the header and
    set-up lines of the sweep's own array (``options.script`` through ``plain_array_script``)."""
    argv = [quote(a) for a in task_argv(p.store, "", p.benchmarks, args)]
    argv[argv.index("--model") + 1] = '"${STEPS[SLURM_ARRAY_TASK_ID]}"'
    lines = [f"{quote(sys.executable)} -u -m deepscaler.eval {argv[0]}"]  # then a line per flag and override
    for i, word in enumerate(argv[1:], 1):
        if word.startswith("--") or i >= len(argv) - len(args.overrides):
            lines.append(word)
        else:
            lines[-1] += f" {word}"
    parallel = min(p.parallel or len(todo), len(todo))  # as submitit caps it
    return plain_array_script(
        p.cfg.slurm, task_resources(p.cfg), name=job_name(p.store), folder=log_folder(p.store),
        comment=f"evaluation of run '{p.store.run}' stage {p.store.stage}, one array task per step "
                "(python -m deepscaler.eval sweep --emit-sbatch; submit it with sbatch)",
        tasks=len(todo), parallel=parallel,
        prelude=["", "# array task i evaluates STEPS[i]", f"STEPS=({' '.join(quote(w) for w in todo)})"],
        command=" \\\n    ".join(lines))


def emit_sbatch(p: Plan, args: argparse.Namespace, path: Path) -> int:
    """Claim the steps as a sweep does at submit, then write the script atomically; submit nothing.
    Unsubmitted, the claims keep the steps' weights until a sweep or ``run`` evaluates them."""
    private_dir(log_folder(p.store))  # Slurm opens the tasks' logs there: it must exist
    todo, marked = claim(p.store, p.todo, p.benchmarks)
    if not todo:
        return 0
    try:
        atomic_write_text(path, sbatch_script(p, todo, args))
    except OSError as e:
        for step in marked:
            p.store.clear_eval_pending(step)
        raise EvalError(f"--emit-sbatch {path}: cannot write it ({e.strerror or e})") from None
    steps = [w for w in todo if w != BASE_EVAL]
    print(f"wrote {path}: an array of {len(todo)} task(s); nothing submitted"
          + (f"; steps {', '.join(map(str, steps))} are claimed (evals/step_N/PENDING: retention keeps them "
             "until evaluated)" if steps else ""))
    print(f"sbatch {quote(path.resolve())}")
    return 0


def wait(jobs: list, todo: list[int | str], store: RunStore, poll_s: float = 5.0) -> int:
    """Poll the tasks until all have ended, printing a line whenever the counts change."""
    last = {}

    def show(states: dict[str, str]) -> None:
        counts = Counter(states.values())  # a task sacct does not know yet reads PENDING (wait_for_jobs)
        line = ", ".join(f"{s} {c}" for s, c in sorted(counts.items()))
        if line != last.get("line"):
            done = sum(1 for s in states.values() if ended(s))
            print(f"eval array {jobs[0].job_id.split('_')[0]}: {done}/{len(jobs)} ended ({line})", flush=True)
            last["line"] = line

    states = wait_for_jobs(jobs, show, poll_s)
    failed = [(w, j, states[j.job_id]) for w, j in zip(todo, jobs) if states[j.job_id] != "COMPLETED"]
    code = _finish(store)
    if failed:
        for w, j, s in failed:
            print(f"error: task {j.job_id} ({label(w)}) ended {s}; its log: {j.paths.stderr}", file=sys.stderr)
        print("rerun the sweep to retry only what is missing", file=sys.stderr)
        return 1
    return code
