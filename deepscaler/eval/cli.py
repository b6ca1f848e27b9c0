"""``python -m deepscaler.eval``: evaluate weights steps on the math benchmarks.

    python -m deepscaler.eval run --model 100|latest|base|PATH_OR_HUB_ID [--benchmarks math500,aime2024] \\
        [--output-dir DIR] [--run NAME] [--stage K] [--preset tiny] [--seed S] [key=value ...]
    python -m deepscaler.eval sweep --output-dir DIR [--run NAME] [--stage K] [--steps all|100,200] \\
        [--include-base] [--max-parallel N] [--force] [--wait | --dry-run | --emit-sbatch FILE]
    python -m deepscaler.eval report --output-dir DIR [--run NAME] [--stage K]
    python -m deepscaler.eval upload --output-dir DIR [--run NAME] [--stage K] --step N --repo-id ORG/NAME \\
        [--public] [--dry-run]

The command line only: ``run`` is one evaluation (``deepscaler/eval/run.py``), ``sweep`` one
Slurm array over the steps (``deepscaler/eval/sweep.py``), ``report`` the table and the plot
(``deepscaler/eval/report.py``), ``upload`` a weights step to the Hugging Face Hub with a model
card (``deepscaler/eval/hub.py``; also the ``deepscaler-upload`` console script, which is
``upload`` of this command line). Errors are one line (``error: ...``, exit 2). docs/eval.md
is the reference.
"""

from __future__ import annotations

import argparse
import sys

from deepscaler.config import ConfigError, parse_command_line, refuse_repeated_keys
from deepscaler.data import BENCHMARKS, DataError
from deepscaler.eval.hub import UploadError, check_repo_id, upload_plan, upload_step
from deepscaler.eval.report import ReportError, report_to_wandb, write_report
from deepscaler.eval.run import EvalError, EvalRequest, resolve_run, run_eval
from deepscaler.eval.sweep import sweep
from deepscaler.store import StoreError


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
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--wait", action="store_true", help="block until the array ends, then write the report")
    mode.add_argument("--dry-run", action="store_true",
                      help="print what would be submitted: each task, the sbatch script")
    mode.add_argument("--emit-sbatch", metavar="FILE",
                      help="write a plain sbatch array script to FILE (claims the steps; submits nothing)")
    s.add_argument("overrides", nargs="*", metavar="key=value")

    rep = sub.add_parser("report", help="the results table (report.md) and plot (eval.png) of a stage")
    _common(rep)

    up = sub.add_parser("upload", help="upload a weights step to the Hugging Face Hub with a model card",
                        description="A weights step as a Hugging Face model repository, with a model card.")
    _common(up)
    up.add_argument("--step", type=int, required=True, help="the weights step to upload")
    up.add_argument("--repo-id", required=True, help="the model repository, e.g. my-org/DeepScaleR-1.5B-repro")
    visibility = up.add_mutually_exclusive_group()
    visibility.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    visibility.add_argument("--private", action="store_true",
                            help="create the repository private: the default, still accepted for old scripts")
    up.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    p.commands = {"run": r, "sweep": s, "report": rep, "upload": up}  # type: ignore[attr-defined]
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Subcommand arguments with ``key=value`` overrides anywhere among the flags, as in the other
    commands (argparse's intermixed parsing does not work through subparsers, so per command)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in parser.commands:
        args = parse_command_line(parser.commands[argv[0]], argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # help, or the error naming the valid commands


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "upload":
        return _upload(args)
    try:
        refuse_repeated_keys(getattr(args, "overrides", []))
        if args.command == "run":
            request = EvalRequest(model=args.model, output_dir=args.output_dir, run=args.run, stage=args.stage,
                                  benchmarks=args.benchmarks, preset=args.preset, seed=args.seed,
                                  skip_existing=args.skip_existing, overrides=tuple(args.overrides))
            run_eval(request)
            return 0
        if args.command == "sweep":
            return sweep(args)
        store = resolve_run(args.output_dir, args.run, args.stage)
        md, png = write_report(store)
        print(md.read_text(encoding="utf-8"), end="")
        print(f"wrote {md} and {png}")
        note = report_to_wandb(store, png)
        if note:
            print(f"logged to {note}")
        return 0
    except (ConfigError, DataError, StoreError, EvalError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the eval server was stopped", file=sys.stderr)
        return 130


def _upload(args: argparse.Namespace) -> int:
    """``upload``: the dry run's listing and card, or the one-commit upload and its URL."""
    try:
        check_repo_id(args.repo_id)
        store = resolve_run(args.output_dir, args.run, args.stage)
        if args.dry_run:
            print(upload_plan(store, args.step, args.repo_id, private=not args.public), end="")
            return 0
        url = upload_step(store, args.step, args.repo_id, private=not args.public)
        print(f"uploaded weights step {args.step} of run '{store.run}' stage {store.stage}: {url}")
        return 0
    except (ConfigError, StoreError, EvalError, UploadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def upload_main(argv: list[str] | None = None) -> int:
    """The ``deepscaler-upload`` console script: ``python -m deepscaler.eval upload`` with the same flags."""
    return main(["upload", *(sys.argv[1:] if argv is None else argv)])
