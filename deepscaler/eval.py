"""``python -m deepscaler.eval``: evaluate weights steps on the math benchmarks.

    python -m deepscaler.eval run --model 100|latest|base|PATH_OR_HUB_ID [--benchmarks math500,aime2024] \\
        [--output-dir DIR] [--run NAME] [--stage K] [--preset tiny] [--seed S] [key=value ...]
    python -m deepscaler.eval sweep --output-dir DIR [--run NAME] [--stage K] [--steps all|100,200] \\
        [--include-base] [--max-parallel N] [--force] [--wait] [--dry-run]
    python -m deepscaler.eval report --output-dir DIR [--run NAME] [--stage K]

One evaluation (``run``) starts an inference server as a child process (the same server and
backends as training: ``--weights-step N`` on the run's config, or ``base`` for ``model.name``),
samples ``eval.benchmarks.<name>.samples`` completions per problem with the eval sampling
settings, scores them with the training reward, and writes ``evals/step_N/<bench>.json`` (or
``evals/base/``): every sample and the summary. ``sweep`` submits one Slurm array over the
steps (``deepscaler/evalsweep.py``); ``report`` writes the table and the plot
(``deepscaler/report.py``). docs/eval.md is the reference.

Why a server rather than loading the model here: the numbers must come from the exact sampling
code the policy was trained with (vLLM on GPU, transformers on CPU), and the server already
knows how to load a weights step safely (leased against retention).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from deepscaler.config import find_config, load_config, to_yaml, BenchmarkConfig, Config, ConfigError
from deepscaler.process import apply_process_settings
from deepscaler.data import BENCHMARKS, DataError, Problem, build_prompts, load_benchmark
from deepscaler.evalmetrics import default_pass_k, format_line, summarize
from deepscaler.report import ReportError
from deepscaler.store import BASE_EVAL, EVAL_PENDING, RunStore, StoreError, atomic_write_text, read_json

# One generate request holds a whole benchmark (the backend batches inside a request); on one
# GPU AIME at 32k tokens takes ~25 min. The Slurm time limit bounds a task, not this.
REQUEST_TIMEOUT_S = 24 * 3600.0
_STEP_SPEC = re.compile(r"^(0|[1-9][0-9]*)$")


class EvalError(RuntimeError):
    """An evaluation that cannot run (bad step, missing run, a failed server). One line first."""


# --------------------------------------------------------------------------- resolving what to evaluate


def find_runs(output_dir: Path, stage: int) -> list[str]:
    """Runs under ``output_dir`` that have ``stage<K>/run.yaml``."""
    return sorted(p.parent.parent.name for p in Path(output_dir).glob(f"*/stage{stage}/run.yaml"))


def resolve_run(output_dir: str | os.PathLike, run: str | None, stage: int) -> RunStore:
    """The stage of an existing run; without ``--run``, the only run there is. One-line errors."""
    output_dir = Path(output_dir)
    if run is not None:
        store = RunStore(output_dir, run, stage)
        if not store.run_yaml.is_file():
            known = find_runs(output_dir, stage)
            raise EvalError(f"{store.root}: no run here (no run.yaml); runs with a stage {stage} in "
                            f"{output_dir}: {', '.join(known) or 'none'}")
        return store
    runs = find_runs(output_dir, stage)
    if not runs:
        raise EvalError(f"{output_dir}: no run (no <run>/stage{stage}/run.yaml under it)")
    if len(runs) > 1:
        raise EvalError(f"{output_dir} holds several runs with a stage {stage} ({', '.join(runs)}): pass --run")
    return RunStore(output_dir, runs[0], stage)


def _ad_hoc_name(model: str) -> str:
    """A run name for evaluating a model that belongs to no run: its folder or Hub name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model.rstrip("/")).name).lstrip(".")
    return name or "model"


def eval_config(model: str, output_dir: str | os.PathLike | None, run: str | None, stage: int,
                preset: str | None = None, overrides: list[str] = ()) -> tuple[Config, RunStore, int | str]:
    """(config, store, what) for ``run --model``: ``what`` is a weights step or ``"base"``.

    A step (``N`` or ``latest``) needs a run: its ``run.yaml`` is the config, so a tiny run is
    evaluated with tiny settings. ``base`` is ``model.name`` of the run (or of ``yaml/eval.yaml``
    when there is no run). Any other value is a model folder or Hub id, evaluated as the base
    of a run named after it (``evals/base/``). ``--preset`` and ``key=value`` apply on top; the
    run's identity (output dir, name, stage) always stays.
    """
    output_dir = Path(output_dir if output_dir is not None else "outputs")
    is_step = bool(_STEP_SPEC.match(model)) or model == "latest"
    path = None if is_step or model == "base" else model
    if path is not None and Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    presets = [find_config(preset)] if preset else []
    model_name = path
    if is_step:
        store = resolve_run(output_dir, run, stage)
    elif run is not None:
        store = RunStore(output_dir, run, stage)
    else:
        runs = find_runs(output_dir, stage)
        if path is None and len(runs) > 1:
            raise EvalError(f"{output_dir} holds several runs with a stage {stage} ({', '.join(runs)}): pass --run")
        if path is None and runs:
            store = RunStore(output_dir, runs[0], stage)
        else:  # a model of no run: a run of its own, named after the model
            name = _ad_hoc_name(path or load_config([find_config("eval"), *presets], list(overrides)).model.name)
            store = RunStore(output_dir, name, stage)
    has_run = store.run_yaml.is_file()
    trained_from = load_config(store.run_yaml).model.name if has_run else None
    if has_run and not path:
        model_name = trained_from  # a preset does not change what the run trained
    if path and has_run:
        if trained_from != path:
            raise EvalError(f"run '{store.run}' was trained from {trained_from}, not {path}: its evals/base/ is "
                            f"that model's; evaluate {path} under another --run")
    files: list[Any] = [store.run_yaml if has_run else find_config("eval"), *presets]
    cfg = load_config(files, list(overrides))
    # Set, not overridden as text: a path is no YAML value (``a: b`` would parse as a mapping).
    cfg = replace(cfg, run=replace(cfg.run, output_dir=str(output_dir), name=store.run, stage=stage))
    if model_name:
        cfg = replace(cfg, model=replace(cfg.model, name=model_name))
    if not has_run:  # so that report (and a later run) find this model's evals like a run's
        atomic_write_text(store.run_yaml, to_yaml(cfg))
    if not is_step:
        return cfg, store, BASE_EVAL
    if model == "latest":
        latest = store.latest_stable("weights")
        if latest is None:
            raise EvalError(f"{store.weights_dir}: no stable weights step to evaluate")
        return cfg, store, latest
    step = int(model)
    store.step_dir("weights", step)  # StepNotFound: one line, listing the stable steps
    return cfg, store, step


def benchmark_config(cfg: Config, name: str) -> BenchmarkConfig:
    """A benchmark's settings: ``eval.benchmarks.<name>``, or one sample per problem for the
    other bundled sets (``amc``, ``minerva``, ``olympiad_bench``)."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return cfg.eval.benchmarks.get(name) or BenchmarkConfig()


def parse_benchmarks(text: str | None, cfg: Config) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()] if text else list(cfg.eval.benchmarks)
    if not names:
        raise DataError("--benchmarks: name at least one benchmark")
    for name in names:
        benchmark_config(cfg, name)
    return list(dict.fromkeys(names))


def is_evaluated(store: RunStore, what: int | str, benchmarks: list[str]) -> bool:
    return all(store.eval_path(what, b).is_file() for b in benchmarks)


def label(what: int | str) -> str:
    return BASE_EVAL if what == BASE_EVAL else f"step_{what}"


# --------------------------------------------------------------------------- one evaluation


def _problems(cfg: Config, bench: str) -> tuple[list[Problem], int]:
    """The benchmark's problems (the first ``max_problems`` with the tiny preset) and its size."""
    problems = load_benchmark(bench)
    limit = benchmark_config(cfg, bench).max_problems
    return problems[:limit], len(problems)


def server_config(cfg: Config, longest_prompt: int) -> Config:
    """The server's config: the eval's, with a max model length that fits the longest prompt
    plus ``eval.max_response_tokens`` (training sized it for its own, shorter responses)."""
    from deepscaler.inference.server import max_model_len

    needed = longest_prompt + cfg.eval.max_response_tokens
    inference = replace(cfg.inference, max_model_len=max(max_model_len(cfg), needed))
    return replace(cfg, inference=inference)


def evaluate(cfg: Config, store: RunStore, what: int | str, benchmarks: list[str], seed: int | None = None,
             skip_existing: bool = False, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Evaluate ``weights/step_N`` (or the base model) on ``benchmarks``; returns {bench: summary}.

    Writes ``evals/<step_N|base>/<bench>.json`` per benchmark as soon as it is done. Holds a
    lease on the weights step throughout, so retention cannot delete it under the eval, and
    removes the step's PENDING marker once every benchmark a sweep asked for is there.
    """
    from deepscaler.inference.client import ServerError, wait_for_servers
    from deepscaler.launch import TOKEN_ENV, start, stop
    from deepscaler.hf_loading import load_tokenizer, model_source
    from deepscaler.reward import BatchScorer

    seed = cfg.eval.seed if seed is None else seed
    todo = [b for b in benchmarks if not (skip_existing and store.eval_path(what, b).is_file())]
    for b in benchmarks:
        if b not in todo:
            echo(f"{label(what)}/{b}: already evaluated ({store.eval_path(what, b)})")
    results: dict[str, dict] = {}
    if not todo:
        _clear_pending(store, what)
        return results
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    suffix = f"j{job}_{task}" if job and task else f"j{job}" if job else f"p{os.getpid()}"
    name = f"eval-{label(what)}-{suffix}"
    store.evals_dir.mkdir(parents=True, exist_ok=True)
    store.logs_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if what == BASE_EVAL:
            source = model_source(cfg)
            tokenizer = load_tokenizer(source, cfg.model.revision)
        else:
            try:
                source = str(stack.enter_context(store.lease("weights", what, holder=name)))
            except StoreError:
                _clear_pending(store, what)  # retention got there first: nothing left to protect
                raise
            tokenizer = load_tokenizer(source)
        prompts = {}
        for bench in todo:
            problems, total = _problems(cfg, bench)
            kept, _ = build_prompts(problems, tokenizer, max_prompt_tokens=10**9)  # eval drops no prompt
            prompts[bench] = (kept, total)
        longest = max(len(ids) for kept, _ in prompts.values() for _, _, ids in kept)
        server_yaml = store.logs_dir / f"{name}.yaml"
        atomic_write_text(server_yaml, to_yaml(server_config(cfg, longest)))
        token = secrets.token_hex(16)
        env = {**os.environ, TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "deepscaler.inference", "--config", str(server_yaml), "--name", name,
                "--host", "127.0.0.1", "--weights-step", "base" if what == BASE_EVAL else str(what)]
        t0 = time.perf_counter()
        child = start(name, argv, store, env)
        stack.callback(stop, [child])
        try:
            client = wait_for_servers(store, [name], cfg.inference.startup_timeout_s,
                                      procs={name: child.proc}, token=token)[name]
        except ServerError as e:
            raise EvalError(str(e)) from None
        client.timeout_s = REQUEST_TIMEOUT_S
        server_start_s = time.perf_counter() - t0
        echo(f"{label(what)}: {cfg.inference.backend} server {name} ready in {server_start_s:.1f}s ({source})")
        scorer = stack.enter_context(BatchScorer(cfg.orchestrator.reward.workers or None,
                                                 cfg.orchestrator.reward.deadline_s))
        expected_step = -1 if what == BASE_EVAL else what
        for bench in todo:
            kept, total = prompts[bench]
            bc = benchmark_config(cfg, bench)
            n, k = bc.samples, default_pass_k(bc.samples, bc.pass_k)
            t_bench = time.perf_counter()
            try:
                gen = client.generate([ids for _, _, ids in kept], n=n, max_tokens=cfg.eval.max_response_tokens,
                                      temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, seed=seed)
            except ServerError as e:
                raise EvalError(str(e)) from None
            if gen.weight_step != expected_step:
                raise EvalError(f"server {name} answered with weights step {gen.weight_step}, expected {expected_step}")
            flat = [(p, j, s) for (p, _, _), group in zip(kept, gen.samples) for j, s in enumerate(group)]
            texts = tokenizer.batch_decode([s.token_ids for _, _, s in flat], skip_special_tokens=True)
            scores = scorer.score([(text, p.answers) for (p, _, _), text in zip(flat, texts)])
            samples = [{"problem_id": p.id, "sample": j, "answer": p.answer, "response": text,
                        "tokens": len(s.token_ids), "score": score, "truncated": s.truncated,
                        "finish_reason": s.finish_reason}
                       for (p, j, s), text, score in zip(flat, texts, scores)]
            summary = summarize(samples, n, k, time.perf_counter() - t_bench)
            summary = {"benchmark": bench, "step": what, "model": source, "weight_step": gen.weight_step,
                       "backend": cfg.inference.backend, **summary, "problems_in_benchmark": total,
                       "max_problems": bc.max_problems, "seed": seed, "temperature": cfg.eval.temperature,
                       "top_p": cfg.eval.top_p, "max_response_tokens": cfg.eval.max_response_tokens,
                       "server_start_s": server_start_s, "slurm_job": f"{job}_{task}" if task else job,
                       "created_unix": time.time()}
            summary["line"] = format_line(bench, summary)
            path = store.write_eval(what, bench, {"summary": summary, "samples": samples})
            echo(summary["line"])
            echo(f"  -> {path}")
            results[bench] = summary
    _clear_pending(store, what)
    return results


def _clear_pending(store: RunStore, what: int | str) -> None:
    """Drop the sweep's PENDING marker of a step once every benchmark it names is evaluated."""
    if what == BASE_EVAL:
        return
    marker = store.eval_dir(what) / EVAL_PENDING
    try:
        wanted = read_json(marker).get("benchmarks", [])
    except FileNotFoundError:
        return
    except StoreError:
        wanted = []
    if is_evaluated(store, what, list(wanted)) or not store.is_stable("weights", what):
        store.clear_eval_pending(what)


# --------------------------------------------------------------------------- CLI


def _common(p: argparse.ArgumentParser, output_default: str | None = "outputs") -> None:
    p.add_argument("--output-dir", default=output_default, help="where runs are written (default: outputs)")
    p.add_argument("--run", help="the run's name (default: the only run in --output-dir)")
    p.add_argument("--stage", type=int, default=1, help="the stage (default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepscaler.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="evaluate one weights step, the base model, or a model folder")
    r.add_argument("--model", required=True, help="a weights step N, latest, base, or a model folder / Hub id")
    r.add_argument("--benchmarks", help=f"comma list (default: eval.benchmarks); known: {', '.join(BENCHMARKS)}")
    _common(r)
    r.add_argument("--preset", help="a preset laid over the run's config, e.g. tiny")
    r.add_argument("--seed", type=int, help="sampling seed (default: eval.seed)")
    r.add_argument("--skip-existing", action="store_true", help="keep benchmarks already evaluated")
    r.add_argument("overrides", nargs="*", metavar="key=value")

    s = sub.add_parser("sweep", help="one Slurm array task per weights step of a stage")
    _common(s)
    s.add_argument("--steps", default="all", help="all (default), or a comma list of steps")
    s.add_argument("--include-base", action="store_true", help="also evaluate the base model (evals/base/)")
    s.add_argument("--benchmarks", help="comma list (default: eval.benchmarks)")
    s.add_argument("--preset", help="a preset laid over the run's config, e.g. tiny")
    s.add_argument("--seed", type=int, help="sampling seed (default: eval.seed)")
    s.add_argument("--max-parallel", type=int, help="array tasks running at once (default: eval.max_parallel)")
    s.add_argument("--force", action="store_true", help="re-evaluate steps that have results")
    s.add_argument("--wait", action="store_true", help="block until the array ends, then write the report")
    s.add_argument("--dry-run", action="store_true", help="print what would be submitted, and the sbatch line")
    s.add_argument("overrides", nargs="*", metavar="key=value")

    rep = sub.add_parser("report", help="the results table (report.md) and plot (eval.png) of a stage")
    _common(rep)

    st = sub.add_parser("steps", help="print the stable weights steps of a stage (for slurm/eval_array.sbatch)")
    _common(st)
    st.add_argument("--index", type=int, help="print only the step at this 0-based index")
    p.commands = {"run": r, "sweep": s, "report": rep, "steps": st}  # type: ignore[attr-defined]
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Subcommand arguments with ``key=value`` overrides anywhere among the flags, as in the other
    commands (argparse's intermixed parsing does not work through subparsers, so per command)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in parser.commands:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # help, or the error naming the valid commands


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            cfg, store, what = eval_config(args.model, args.output_dir, args.run, args.stage, args.preset, args.overrides)
            apply_process_settings(cfg)
            benchmarks = parse_benchmarks(args.benchmarks, cfg)
            print(f"# evaluating {label(what)} of run '{store.run}' stage {store.stage} on {', '.join(benchmarks)}",
                  flush=True)
            evaluate(cfg, store, what, benchmarks, args.seed, args.skip_existing,
                     echo=lambda line: print(line, flush=True))
            return 0
        if args.command == "sweep":
            from deepscaler.evalsweep import sweep

            return sweep(args)
        if args.command == "report":
            from deepscaler.report import write_report

            store = resolve_run(args.output_dir, args.run, args.stage)
            md, png = write_report(store)
            print(md.read_text(encoding="utf-8"), end="")
            print(f"wrote {md} and {png}")
            return 0
        store = resolve_run(args.output_dir, args.run, args.stage)
        steps = store.stable_steps("weights")
        if args.index is None:
            print("\n".join(map(str, steps)))
            return 0
        if not 0 <= args.index < len(steps):
            raise EvalError(f"index {args.index}: {store.weights_dir} has {len(steps)} stable steps {steps}")
        print(steps[args.index])
        return 0
    except (ConfigError, DataError, StoreError, EvalError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the eval server was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
