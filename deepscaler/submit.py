"""``python -m deepscaler.submit``: one command per training stage.

    python -m deepscaler.submit --stage 1 --preset tiny --dry-run
    python -m deepscaler.submit --stages 1,2,3 slurm.partition=gpu

The config is ``yaml/stage<K>.yaml``, then the preset, then ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import sys

from deepscaler.config import Config, ConfigError, stage_config, to_yaml


def parse_stages(args: argparse.Namespace) -> list[int]:
    text = args.stages if args.stages is not None else str(args.stage)
    try:
        stages = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--stages '{text}': expected stage numbers such as 1,2,3") from None
    if not stages or any(s < 1 for s in stages):
        raise ConfigError(f"--stages '{text}': expected stage numbers such as 1,2,3")
    return stages


def resolve(args: argparse.Namespace) -> list[Config]:
    """One resolved config per stage, with the CLI flags applied as overrides."""
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    return [stage_config(k, args.preset, overrides) for k in parse_stages(args)]


def describe(cfg: Config) -> str:
    """A short human summary of what a stage will run."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    gpus = inf.nodes * inf.gpus_per_node
    servers = max(gpus // cfg.inference.tensor_parallel, 1)
    return (
        f"stage {cfg.run.stage} of run '{cfg.run.name}' in {cfg.run.output_dir}: "
        f"{cfg.model.name}, {cfg.run.max_steps or 'all'} steps of "
        f"{cfg.orchestrator.prompts_per_step}x{cfg.sampling.samples_per_prompt} samples "
        f"up to {cfg.sampling.max_response_tokens} tokens; "
        f"{servers} {cfg.inference.backend} server(s) on {inf.nodes} node(s), "
        f"trainer on {tr.nodes} node(s) x {tr.gpus_per_node} GPU(s)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepscaler.submit", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stage", type=int, default=1, help="the stage to run (default 1)")
    which.add_argument("--stages", help="chain stages, e.g. 1,2,3")
    p.add_argument("--preset", help="a preset applied on top of the stage file, e.g. tiny")
    p.add_argument("--output-dir", help="where runs are written (run.output_dir)")
    p.add_argument("--max-steps", type=int, help="steps to run in each stage (run.max_steps)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan; submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.optimizer.lr=2e-6")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = resolve(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(
            "error: running a stage needs the trainer and orchestrator, which are not built yet; "
            "use --dry-run to check the config",
            file=sys.stderr,
        )
        return 2
    for cfg in configs:
        print(f"# {describe(cfg)}")
        print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
