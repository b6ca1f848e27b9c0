"""``python -m deepscaler.submit``: one command per training stage.

    python -m deepscaler.submit --stage 1 --preset tiny                 # runs here, on CPU
    python -m deepscaler.submit --stages 1,2,3 slurm.partition=gpu      # chained Slurm jobs

The config is ``yaml/stage<K>.yaml``, then each ``--preset`` in order, then ``key=value`` overrides.
``--executor local`` runs the stage's processes on this machine; ``slurm`` submits them as
one heterogeneous job (the default when ``sbatch`` is on the PATH).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from deepscaler.config import (Config, ConfigError, load_config, parse_command_line, refuse_repeated_keys, server_names,
                               shared_shape, stage_config, stage_layout, to_yaml, trainer_ranks)
from deepscaler.data import DataError
from deepscaler.process import apply_process_settings
from deepscaler.store import RunStore, StoreError
from deepscaler.tracking import offline_note, require_package


def parse_stages(args: argparse.Namespace) -> list[int]:
    """``--stage K`` or ``--stages A,B,...`` -> the stages to run, refused at once when the chain
    cannot run: stage K's config starts from stage K-1's checkpoint (``checkpoint.init_from_stage``
    in yaml/stage2.yaml, stage3.yaml), so a chain is consecutive and increasing (1,2,3; 2,3)."""
    if args.stage is not None and args.stages is not None:
        raise ConfigError(f"--stage {args.stage} and --stages '{args.stages}': give one of them, not both")
    text = args.stages if args.stages is not None else str(1 if args.stage is None else args.stage)
    expected = f"--stages '{text}': expected stage numbers such as 1,2,3"
    parts = [s.strip() for s in text.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ConfigError(expected)
    stages = [int(p) for p in parts]
    if any(s < 1 for s in stages):
        raise ConfigError(expected)
    for before, stage in zip(stages, stages[1:]):
        if stage != before + 1:
            start = f"stage {stage - 1}" if stage > 1 else "the base model"
            raise ConfigError(f"--stages '{text}': stage {stage} starts from {start}, not from stage {before}; "
                              "chain consecutive stages in order, e.g. 1,2,3 or 2,3")
    return stages


# Folders local to each machine: a run there is not seen by the compute nodes of a cluster.
NODE_LOCAL = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


def node_local(path: str) -> Path | None:
    """The folder of NODE_LOCAL that ``path`` is under, where Slurm has nodes other than this
    machine (not on a one-machine cluster, such as the tests', whose jobs see its /tmp)."""
    local = next((d for d in NODE_LOCAL if d in (Path(path), *Path(path).parents)), None)
    return local if local is not None and nodes_elsewhere() else None


def nodes_elsewhere() -> bool:
    """Whether sinfo lists a node that has neither this machine's name nor a loopback address;
    False where sinfo cannot tell (not on the PATH, failing): a warning needs evidence."""
    try:
        done = subprocess.run(["sinfo", "-N", "-h", "-o", "%o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    here = {"localhost", "::1", socket.gethostname(), socket.getfqdn()}
    return done.returncode == 0 and any(a not in here and not a.startswith("127.") for a in done.stdout.split())


def chosen_executor(args: argparse.Namespace) -> str:
    """``--executor``, with ``auto`` made ``slurm`` where sbatch is on the PATH, else ``local``."""
    return args.executor if args.executor != "auto" else ("slurm" if shutil.which("sbatch") else "local")


def resolve(args: argparse.Namespace) -> list[Config]:
    """One resolved config per stage, with the CLI flags applied as overrides, and its paths
    absolute: run.yaml and the jobs must not depend on the folder submit ran in."""
    from deepscaler.stage import parse_resume_step

    parse_resume_step(args.resume_step)  # a malformed --resume-step is refused even with --dry-run
    overrides = refuse_repeated_keys(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.no_hetjob:
        overrides.append("slurm.hetjob=false")
    stages = parse_stages(args)
    general, per_stage = split_stage_overrides(overrides, stages)
    configs = [stage_config(k, args.presets, general + per_stage.get(k, [])) for k in stages]
    for cfg in configs:
        cfg.run.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))
        if cfg.data.cache_dir is not None:
            cfg.data.cache_dir = os.path.abspath(os.path.expanduser(cfg.data.cache_dir))
    for out in dict.fromkeys(cfg.run.output_dir for cfg in configs) if chosen_executor(args) == "slurm" else ():
        local = node_local(out)
        if local is not None:
            print(f"warning: run.output_dir {out} is under {local}, which is usually local to each machine: "
                  "the compute nodes may not see it; use a shared filesystem (--output-dir)", file=sys.stderr)
    for before, cfg in zip(configs, configs[1:]):
        refuse_optimizer_reshape(before, cfg)
    return configs


def refuse_optimizer_reshape(before: Config, cfg: Config) -> None:
    """A stage that loads the previous stage's optimizer state needs its trainer shape: ZeRO's
    optimizer partitions are per rank. Weights alone (``load_optimizer: false``, stage2.yaml and
    stage3.yaml) load into any shape. Refused at submit, not in the job after stage K ran."""
    ck = cfg.checkpoint
    if ck.init_from_stage != before.run.stage or not ck.load_optimizer:
        return
    old = (trainer_ranks(before), before.trainer.deepspeed.zero_stage)
    new = (trainer_ranks(cfg), cfg.trainer.deepspeed.zero_stage)
    if old != new:
        k = cfg.run.stage
        raise ConfigError(f"stage {k} loads stage {before.run.stage}'s optimizer state (checkpoint.load_optimizer: "
                          f"true), partitioned for {old[0]} trainer rank(s) with ZeRO-{old[1]}, but stage {k} has "
                          f"{new[0]} with ZeRO-{new[1]}: give stage {k} the same trainer shape, or load the weights "
                          f"only (stage{k}.checkpoint.load_optimizer=false)")


def split_stage_overrides(overrides: list[str], stages: list[int]) -> tuple[list[str], dict[int, list[str]]]:
    """``stageK.key=value`` applies to stage K only, after the overrides of every stage: a chain
    whose stages differ in more than their yaml (``--stages 1,2 --preset tiny-random
    stage2.slurm.trainer.nodes=2``: the preset gives every stage one node). A stage that is
    not in the chain is refused (a typo would otherwise be ignored)."""
    general: list[str] = []
    per_stage: dict[int, list[str]] = {}
    for text in overrides:
        head, dot, rest = text.partition(".")
        if dot and head.startswith("stage") and head[5:].isascii() and head[5:].isdigit() and "=" in rest:
            k = int(head[5:])
            if k not in stages:
                raise ConfigError(f"override '{text}': stage {k} is not among the stages submitted "
                                  f"({','.join(map(str, stages))})")
            per_stage.setdefault(k, []).append(rest)
        else:
            general.append(text)
    return general, per_stage


def describe(cfg: Config) -> str:
    """A short human summary of what a stage will run."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    servers = f"{len(server_names(cfg))} {cfg.inference.backend} server(s)"
    if stage_layout(cfg) == "shared":
        nodes, gpus = shared_shape(cfg)
        where = f"{servers} and {trainer_ranks(cfg)} trainer rank(s) sharing {nodes} node(s) x {gpus} GPU(s)"
    else:
        where = f"{servers} on {inf.nodes} node(s), trainer on {tr.nodes} node(s) x {tr.gpus_per_node} GPU(s)"
    return (
        f"stage {cfg.run.stage} of run '{cfg.run.name}' in {cfg.run.output_dir}: "
        f"{cfg.model.name}, {cfg.run.max_steps or 'all'} steps of "
        f"{cfg.orchestrator.prompts_per_step}x{cfg.sampling.samples_per_prompt} samples "
        f"up to {cfg.sampling.max_response_tokens} tokens; {where}"
    )


def summary(store: RunStore) -> str:
    """What a finished stage leaves behind, for the end of the command's output."""
    from deepscaler.progress import cell, sampled_rows

    rows = sampled_rows(store.read_metrics().records)
    curve = " ".join(cell(r, "reward_mean", "{:.2f}") for r in rows[-20:])  # '-' for a null
    weights, ckpt = store.latest_stable("weights"), store.latest_stable("checkpoints")
    lines = [
        f"stage {store.stage} of run '{store.run}' finished: {len(rows)} steps",
        f"  reward per step: {curve or '-'}",
        f"  weights:     {store.step_path('weights', weights) if weights is not None else '-'}",
        f"  checkpoint:  {store.step_path('checkpoints', ckpt) if ckpt is not None else '-'}",
        f"  metrics:     {store.metrics_path}",
        f"  logs:        {store.logs_dir}",
    ]
    note = offline_note(load_config(store.run_yaml))
    return "\n".join(lines + ([f"  {note}"] if note else []))


def next_steps(store: RunStore) -> str:
    """How to look at a finished local run, and how to run the real thing: the last lines a
    newcomer's first command prints."""
    run = ["--output-dir", str(store.output_dir), "--run", store.run]
    where = [*run, "--stage", str(store.stage)]
    return "\n".join([
        "next:",
        f"  progress:     {shlex.join(['python', '-m', 'deepscaler.status', *run])}",
        f"  evaluate:     {shlex.join(['python', '-m', 'deepscaler.eval', 'run', '--model', 'latest', *where])}",
        f"  table, plot:  {shlex.join(['python', '-m', 'deepscaler.eval', 'report', *where])}",
        "  on a cluster: python -m deepscaler.submit --stages 1,2,3 slurm.partition=<partition> "
        "slurm.account=<account>  (docs/quickstart.md, part B)",
    ])


def has_gpus(cfg: Config) -> bool:
    return bool(cfg.slurm.inference.gpus_per_node or cfg.slurm.trainer.gpus_per_node)


def plan_gpu_stages(configs: list[Config]) -> dict[int, dict]:
    """The plan (``deepscaler.plan``) of every stage that runs on GPUs, by stage."""
    if not any(map(has_gpus, configs)):
        return {}
    from deepscaler.plan import plan

    return {cfg.run.stage: plan(cfg) for cfg in configs if has_gpus(cfg)}


def resolve_layouts(configs: list[Config], plans: dict[int, dict]) -> tuple[list[Config], dict[int, str]]:
    """Each planned stage as its jobs will run it (``slurm.layout`` resolved by its plan:
    ``deepscaler.plan.resolve_layout``), and its ``# layout:`` line. A layout that would keep
    its GPUs busy less than 70% of the time gets a warning on stderr, now. Trainer shapes may
    change, so a chain that loads an optimizer state is checked again."""
    if not plans:
        return configs, {}
    from deepscaler.plan import busy_warning, layout_name, resolve_layout

    resolved, lines = [], {}
    for cfg in configs:
        p = plans.get(cfg.run.stage)
        if p is not None:
            cfg, lines[cfg.run.stage] = resolve_layout(cfg, p)
            warning = busy_warning(p, layout_name(cfg))
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        resolved.append(cfg)
    for before, cfg in zip(resolved, resolved[1:]):
        refuse_optimizer_reshape(before, cfg)
    return resolved, lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepscaler.submit", description=__doc__.split("\n\n")[0])
    # Not an argparse exclusive group: it misses "--stage 1 --stages 1,2" (1 is the default); parse_stages refuses both.
    p.add_argument("--stage", type=int, help="the stage to run (default 1)")
    p.add_argument("--stages", help="chain stages, e.g. 1,2,3 or 2,3 (consecutive: each starts from the one before)")
    p.add_argument("--preset", dest="presets", action="append", metavar="NAME|FILE",
                   help="a preset or site file applied on top of the stage file, e.g. tiny; repeat to stack them "
                        "in order, the later winning (--preset site.yaml --preset tiny)")
    p.add_argument("--output-dir", help="where runs are written (run.output_dir)")
    p.add_argument("--max-steps", type=int, help="steps to run in each stage (run.max_steps)")
    p.add_argument("--resume-step", help="resume from checkpoints/step_N, or 'latest'")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though recipe keys (sampling, optimizer, loss, data...) differ from run.yaml")
    p.add_argument("--executor", choices=("auto", "local", "slurm"), default="auto",
                   help="local: processes on this machine; slurm: a heterogeneous job (auto: slurm if sbatch is on PATH)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and the resolved config; run nothing")
    p.add_argument("--no-hetjob", action="store_true",
                   help="slurm: two ordinary jobs (servers, then trainer + orchestrator) for clusters without hetjobs")
    p.add_argument("--wait", action="store_true", help="slurm: block and stream progress until the job(s) end")
    p.add_argument("--force", action="store_true",
                   help="submit even when the planner finds that a stage does not fit its GPUs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.optimizer.lr=2e-6")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        configs = resolve(args)
        apply_process_settings(configs[0], job=False)  # run.yaml, logs and the job inherit it
        for cfg in configs:
            require_package(cfg)  # wandb.project set, no wandb: say so now, not in the job
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    executor = chosen_executor(args)
    if executor == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        print("error: sbatch is not on PATH: run this on a Slurm login node, or pass --executor local",
              file=sys.stderr)
        return 2
    from deepscaler.prefetch import CacheError, require_cache

    try:  # the layouts, before anything is written: run.yaml and the jobs get the resolved configs
        plans = plan_gpu_stages(configs)
        configs, layouts = resolve_layouts(configs, plans)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for i, cfg in enumerate(configs):
            print(f"# {describe(cfg)} [{executor}]")
            try:
                require_cache(cfg)
            except CacheError as e:
                print(f"# warning: {e}")
            if cfg.run.stage in plans:
                from deepscaler.plan import table

                print("\n".join(f"# {line.lstrip('# ')}" for line in table(plans[cfg.run.stage]).splitlines()))
                print(f"# layout: {layouts[cfg.run.stage]}")
            if executor == "slurm":
                from deepscaler.slurm.stage_job import dry_run_script

                print(dry_run_script(cfg, dependency=f"afterok:<job of stage {configs[i - 1].run.stage}>" if i else None))
            print(to_yaml(cfg), end="")
        return 0
    for line in layouts.values():
        print(f"# layout: {line}", flush=True)
    root = Path(configs[0].run.output_dir)
    try:
        if root.exists() and not root.is_dir():
            print(f"error: run.output_dir '{root}' is a file, not a directory", file=sys.stderr)
            return 2
    except OSError as e:  # a folder on its way that this user may not enter (another user's)
        print(f"error: {unusable_output_dir(root, e)}", file=sys.stderr)
        return 2
    first = RunStore(configs[0].run.output_dir, configs[0].run.name, configs[0].run.stage)
    from deepscaler.run_lock import live_holder, refusal

    for cfg in configs:  # a stage that another run is running: refused before anything is written
        store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
        other = live_holder(store, stale_s=cfg.run.lock_stale_s)
        if other is not None:
            print(f"error: {refusal(store, other)}", file=sys.stderr)
            return 2
    try:  # a bad --resume-step, or a rerun over a run with progress, before anything is written
        from deepscaler.stage import resolve_resume

        resolve_resume(first, args.resume_step)
        changed = []
        if args.resume_step is not None and first.stable_steps("checkpoints"):  # a resume: its recipe must not drift
            from deepscaler.resume_config import check_resume, listing

            changed = check_resume(first, configs[0], args.resume_step, args.allow_config_change)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.force:  # before any job asks for GPUs: a stage that cannot fit them must not start
        from deepscaler.plan import layout_name
        from deepscaler.plan import refusal as plan_refusal

        for cfg in configs:
            why = cfg.run.stage in plans and plan_refusal(plans[cfg.run.stage], layout_name(cfg))
            if why:
                print(f"error: {why}", file=sys.stderr)
                return 2
    try:  # before any job asks for GPUs: a job that cannot load its model must not start
        for cfg in configs:
            require_cache(cfg)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # an unusable output dir (read-only, full) fails here, in one line, before anything runs
        for cfg in configs:
            RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).ensure_dirs()
    except OSError as e:
        print(f"error: {unusable_output_dir(configs[0].run.output_dir, e)}", file=sys.stderr)
        return 2
    if args.resume_step == "latest" and not first.stable_steps("checkpoints"):
        print(f"notice: --resume-step latest: no checkpoint in {first.checkpoints_dir}; starting from step 0 "
              "(is run.output_dir or run.name mistyped?)", file=sys.stderr, flush=True)
    if changed:
        print(f"notice: resuming with a changed config: {listing(changed)} (the previous run.yaml is kept in "
              f"{first.run_history_dir})", file=sys.stderr, flush=True)
    if executor == "slurm":
        from deepscaler.slurm.stage_job import submit_stages

        code = submit_stages(configs, args.resume_step, wait=args.wait)
        if code or not args.wait:
            return code
        stores = [RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage) for cfg in configs]
        for store in stores:  # every job ended COMPLETED: the end a local run prints
            print(summary(store), flush=True)
        print(next_steps(stores[-1]), flush=True)
        return 0

    from deepscaler.launch import LaunchError, run_stage

    # kill (SIGTERM) or a closed terminal (SIGHUP) stops the stage as Ctrl-C does: this process
    # stops every child and its children, and waits for them, before it exits.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    for i, cfg in enumerate(configs):
        try:  # the line inside: a Ctrl-C just after it (the user read it) is still this handler's
            print(f"# {describe(cfg)}", flush=True)
            # Only the first stage resumes; a later one starts from its predecessor's checkpoint.
            store = run_stage(cfg, args.resume_step if i == 0 else None)
        except KeyboardInterrupt:
            print("interrupted: every process of the stage was stopped; resume with --resume-step latest",
                  file=sys.stderr)
            return 130
        except ConfigError as e:  # refused before anything ran (resume step, existing checkpoints)
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (LaunchError, StoreError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(summary(store), flush=True)
    print(next_steps(store), flush=True)
    return 0


def unusable_output_dir(root, err: OSError) -> str:
    """One line for an output dir this user cannot make or enter (read-only, full, another user's)."""
    return f"run.output_dir '{root}': cannot create {err.filename or 'the run directory'}: {err.strerror}"


if __name__ == "__main__":
    sys.exit(main())
