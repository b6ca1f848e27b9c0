"""``python -m deepscaler.eval sweep``: one Slurm array job, one task per weights step.

Each task runs ``python -m deepscaler.eval run --model N ...`` (the same entry point as a single
eval and as ``slurm/eval_array.sbatch``), in-process under submitit's job runner. What the sweep
decides on the login node:

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
polling of ``--wait`` come with it, as for the training stages.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from deepscaler.config import Config
from deepscaler.process import apply_process_settings
from deepscaler.slurm_time import time_minutes
from deepscaler.eval import EvalError, eval_config, is_evaluated, label, parse_benchmarks, resolve_run
from deepscaler.store import BASE_EVAL, RunStore

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
SBATCH_SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "eval_array.sbatch"


def job_name(store: RunStore) -> str:
    """What ``squeue`` shows: ``deepscaler-<run>-s<K>-eval``."""
    return f"deepscaler-{store.run}-s{store.stage}-eval"


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


def task_argv(store: RunStore, what: int | str, benchmarks: list[str], args: argparse.Namespace) -> list[str]:
    """The ``deepscaler.eval`` command line of one task (absolute output dir: tasks run elsewhere)."""
    argv = ["run", "--model", str(what), "--output-dir", str(store.output_dir.resolve()), "--run", store.run,
            "--stage", str(store.stage), "--benchmarks", ",".join(benchmarks)]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if not args.force:
        argv.append("--skip-existing")
    return argv + list(args.overrides)


class EvalTask:
    """What each array task runs: ``deepscaler.eval``'s ``main`` on the task's argv; a non-zero
    exit fails the task. ``checkpoint`` makes it requeueable in submitit's sense (its signal
    handler calls it at the time limit or on preemption): the requeued task gets
    ``--skip-existing`` and keeps the benchmarks it finished, each being its own file."""

    def __call__(self, argv: list[str]) -> str:
        from deepscaler.eval import main

        code = main(list(argv))
        if code != 0:
            raise RuntimeError(f"python -m deepscaler.eval {shlex.join(argv)} exited with {code}")
        return shlex.join(argv)

    def checkpoint(self, argv: list[str]):
        import submitit

        return submitit.helpers.DelayedSubmission(self, argv if "--skip-existing" in argv else [*argv, "--skip-existing"])


def sbatch_options(cfg: Config, store: RunStore, parallel: int | None) -> dict[str, object]:
    """Slurm options of every task (submitit parameters), from ``eval.resources`` and ``slurm``."""
    res, s = cfg.eval.resources, cfg.slurm
    options: dict[str, object] = {
        "job_name": job_name(store), "time": time_minutes(s.time), "nodes": res.nodes, "ntasks_per_node": 1,
        "cpus_per_task": res.cpus_per_gpu * max(1, res.gpus_per_node), "signal_delay_s": s.signal_delay_s,
    }
    if res.gpus_per_node:
        options["gpus_per_node"] = res.gpus_per_node
    if res.mem:
        options["mem"] = res.mem
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            options[key] = getattr(s, key)
    if parallel:
        options["array_parallelism"] = parallel
    if s.setup:
        options["setup"] = list(s.setup)
    extra = {}
    for line in s.extra_sbatch:  # "--exclusive", "--mail-type=END"
        key, sep, value = line.strip().lstrip("-").partition("=")
        extra[key] = value if sep else True
    if extra:
        options["additional_parameters"] = extra
    return options


def sbatch_lines(cfg: Config, store: RunStore, todo: list[int | str], benchmarks: list[str],
                 args: argparse.Namespace) -> list[str]:
    """The same sweep as plain ``sbatch`` calls of ``slurm/eval_array.sbatch`` (for --dry-run).

    Array indices are positions in the sorted stable steps, as the script reads them when a task
    starts; while training runs (and retention deletes steps) they can shift, which the sweep's
    own tasks, given explicit steps, are immune to."""
    o = sbatch_options(cfg, store, None)
    flags = [f"--job-name={o['job_name']}", f"--time={cfg.slurm.time}", f"--nodes={o['nodes']}",
             "--ntasks-per-node=1", f"--cpus-per-task={o['cpus_per_task']}",
             f"--gpus-per-node={o.get('gpus_per_node', 0)}"]
    flags += [f"--{k}={o[k]}" for k in ("mem", "partition", "account", "qos", "constraint") if k in o]
    flags += [line.strip() for line in cfg.slurm.extra_sbatch]
    logs = store.logs_dir.resolve() / "slurm-eval"
    extra = ["--benchmarks", ",".join(benchmarks)]
    if args.preset:
        extra += ["--preset", args.preset]
    if args.seed is not None:
        extra += ["--seed", str(args.seed)]
    extra += list(args.overrides)
    # The checkout's script; an installed package has none: the name relative to a checkout then.
    script = SBATCH_SCRIPT if SBATCH_SCRIPT.is_file() else Path("slurm/eval_array.sbatch")
    run_dir = store.run_dir.resolve()
    lines = []
    stable = store.stable_steps("weights")
    steps = [s for s in todo if s != BASE_EVAL]
    if steps:
        indices = ",".join(str(stable.index(s)) for s in steps)
        parallel = args.max_parallel or cfg.eval.max_parallel
        array = f"--array={indices}" + (f"%{parallel}" if parallel else "")
        lines.append(shlex.join(["sbatch", array, *flags, f"--output={logs / '%A_%a.out'}", str(script),
                                 str(run_dir), str(store.stage), *extra]))
    if BASE_EVAL in todo:
        lines.append(shlex.join(["sbatch", *flags, f"--output={logs / 'base-%j.out'}", str(script),
                                 str(run_dir), str(store.stage), BASE_EVAL, *extra]))
    return lines


def sweep(args: argparse.Namespace) -> int:
    """Plan, then submit one array (or print it with --dry-run); --wait polls it and writes the report."""
    store = resolve_run(args.output_dir, args.run, args.stage)
    cfg, store, _ = eval_config("base", store.output_dir, store.run, store.stage, args.preset, args.overrides)
    apply_process_settings(cfg, job=False)
    benchmarks = parse_benchmarks(args.benchmarks, cfg)
    wanted: list[int | str] = parse_steps(args.steps, store)
    if args.include_base:
        wanted = [BASE_EVAL, *wanted]
    done = [w for w in wanted if not args.force and is_evaluated(store, w, benchmarks)]
    todo = [w for w in wanted if w not in done]
    parallel = args.max_parallel or cfg.eval.max_parallel
    if args.max_parallel is not None and args.max_parallel < 1:
        raise EvalError(f"--max-parallel {args.max_parallel}: must be 1 or more")
    what = ", ".join(label(w) for w in todo) or "nothing"
    print(f"# sweep of run '{store.run}' stage {store.stage} on {', '.join(benchmarks)}: {len(todo)} task(s): {what}"
          + (f"; already evaluated: {', '.join(label(w) for w in done)}" if done else ""), flush=True)
    if args.dry_run:
        options = sbatch_options(cfg, store, parallel)
        print("# one array job through submitit, one task per line above, with: "
              + " ".join(f"{k}={v}" for k, v in options.items()))
        for w in todo:
            print("python -m deepscaler.eval " + shlex.join(task_argv(store, w, benchmarks, args)))
        print("# or, the same with the plain sbatch script:")
        for line in sbatch_lines(cfg, store, todo, benchmarks, args):
            print(line)
        return 0
    if not todo:
        print("nothing to evaluate: every requested step has results (--force re-evaluates)")
        return _finish(store) if args.wait else 0
    if BASE_EVAL in todo:  # its task loads model.name: check the Hub cache before sbatch (CacheError)
        from deepscaler.prefetch import require_cache

        require_cache(cfg, data=False)
    todo, jobs = submit(cfg, store, todo, benchmarks, args, parallel)
    if not jobs:
        return 0
    if not args.wait:
        print(f"watch with: squeue -u $USER -n {job_name(store)}; then: python -m deepscaler.eval report "
              f"--output-dir {shlex.quote(str(store.output_dir))} --run {shlex.quote(store.run)} --stage {store.stage}")
        return 0
    return wait(jobs, todo, store)


def submit(cfg: Config, store: RunStore, todo: list[int | str], benchmarks: list[str],
           args: argparse.Namespace, parallel: int | None) -> tuple[list[int | str], list]:
    """Mark the steps PENDING (retention keeps them), then submit the array through submitit.
    Returns (what was submitted, its submitit jobs in the same order)."""
    import submitit

    steps = [w for w in todo if w != BASE_EVAL]
    marked = [s for s in steps if s not in store.pending_evals()]  # ours to remove if sbatch fails
    for step in steps:
        store.mark_eval_pending(step, benchmarks)
    gone = [s for s in steps if not store.is_stable("weights", s)]  # deleted before the marker landed
    for s in gone:
        store.clear_eval_pending(s)
    if gone:
        print(f"warning: retention deleted steps {gone} before the sweep could claim them", file=sys.stderr)
        todo = [w for w in todo if w not in gone]
    if not todo:
        return [], []
    folder = (store.logs_dir / "slurm-eval").resolve()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**sbatch_options(cfg, store, parallel or len(todo)))
    argvs = [task_argv(store, w, benchmarks, args) for w in todo]
    try:
        with submitit.helpers.clean_env():  # a sweep from inside a job must not leak SLURM_* into the array
            jobs = executor.map_array(EvalTask(), argvs)
    except Exception as e:  # submitit's FailedJobError carries sbatch's own message
        for step in marked:
            store.clear_eval_pending(step)
        raise EvalError(f"sbatch refused the eval array of run '{store.run}' stage {store.stage}: "
                        f"{' '.join(str(e).split())}") from None
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted eval array {array_id} ({job_name(store)}): "
          + ", ".join(f"{job.job_id}={label(w)}" for w, job in zip(todo, jobs)) + f"; logs in {folder}", flush=True)
    return todo, jobs


def wait(jobs: list, todo: list[int | str], store: RunStore, poll_s: float = 5.0) -> int:
    """Poll the tasks until all have ended, printing a line whenever the counts change."""
    last = None
    while True:
        jobs[0].get_info(mode="force")  # one sacct call refreshes every task of the array
        # submitit says UNKNOWN until sacct has a record of the task: it was submitted, no more
        states = [(j.state.split()[0] if j.state else "UNKNOWN").replace("UNKNOWN", "SUBMITTED") for j in jobs]
        counts = Counter(states)
        line = ", ".join(f"{s} {c}" for s, c in sorted(counts.items()))
        if line != last:
            done = sum(c for s, c in counts.items() if s in FINAL)
            print(f"eval array {jobs[0].job_id.split('_')[0]}: {done}/{len(jobs)} ended ({line})", flush=True)
            last = line
        if all(s in FINAL for s in states):
            break
        time.sleep(poll_s)
    failed = [(w, j, s) for w, j, s in zip(todo, jobs, states) if s != "COMPLETED"]
    code = _finish(store)
    if failed:
        for w, j, s in failed:
            print(f"error: task {j.job_id} ({label(w)}) ended {s}; its log: {j.paths.stderr}", file=sys.stderr)
        print("rerun the sweep to retry only what is missing", file=sys.stderr)
        return 1
    return code


def _finish(store: RunStore) -> int:
    """The report of everything evaluated so far (the sweep's aggregate step)."""
    from deepscaler.report import write_report

    if not store.read_evals():
        return 0
    md, png = write_report(store)
    print(f"wrote {md} and {png}")
    return 0
