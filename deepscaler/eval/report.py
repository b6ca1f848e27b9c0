"""The results of a stage's evals as a Markdown table and a plot (``python -m deepscaler.eval report``).

Reads only what ``deepscaler/eval/run.py`` wrote (``evals/<step_N|base>/<bench>.json``), so a report
can be rebuilt at any time, on a login node, while a sweep is still filling in steps. Writes
``evals/report.md`` (the table in the form of DeepScaleR's README, with the completion lengths,
then the raw ``Evaluated ...`` lines) and ``evals/eval.png`` (accuracy and mean completion length
against the training step, one column per benchmark, with the base model and o1-preview's
AIME 2024 score as reference lines).
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import Any

from deepscaler.store import BASE_EVAL, RunStore, atomic_write_bytes, atomic_write_text

NAMES = {"aime2024": "AIME 2024", "math500": "MATH 500", "amc": "AMC 2023", "minerva": "Minerva Math",
         "olympiad_bench": "OlympiadBench"}
ORDER = ["aime2024", "math500", "amc", "minerva", "olympiad_bench"]  # DeepScaleR's column order
O1_PREVIEW_AIME = 40.0  # o1-preview on AIME 2024 (pass@1, %), DeepScaleR's reference


class ReportError(RuntimeError):
    """A report that cannot be drawn. One line."""


def display(bench: str) -> str:
    return NAMES.get(bench, bench)


def summaries(store: RunStore) -> dict[int | str, dict[str, dict]]:
    """{"base" first, then steps: {bench: summary}} of every finished eval file."""
    return {what: {b: r["summary"] for b, r in benches.items() if isinstance(r, dict) and "summary" in r}
            for what, benches in store.read_evals().items()}


def benchmarks_of(results: dict[Any, dict[str, dict]]) -> list[str]:
    found = {b for per in results.values() for b in per}
    return [b for b in ORDER if b in found] + sorted(found - set(ORDER))


def row_name(what: int | str, summary: dict | None) -> str:
    if what == BASE_EVAL:
        model = (summary or {}).get("model") or "base model"
        return f"{Path(str(model).rstrip('/')).name} (base)"
    return f"step {what}"


def sampled_with(summary: dict) -> str:
    """What sampled a result: backend, vLLM, torch and transformers versions, seed. AIME numbers
    move with the vLLM version and the seed. Results written before versions were recorded
    read "versions unknown" (and "seed unknown" without a seed)."""
    versions = summary.get("versions")
    if isinstance(versions, dict):
        stack = ", ".join(str(versions[k]) for k in ("vllm", "torch", "transformers") if versions.get(k)) or "unknown"
    else:
        stack = "versions unknown"
    seed = summary.get("seed")
    return f"{summary.get('backend') or 'unknown'} backend: {stack}; seed {'unknown' if seed is None else seed}"


def stacks_of(per: dict[str, dict]) -> str:
    """The distinct :func:`sampled_with` of a row's results, in benchmark order."""
    return " / ".join(dict.fromkeys(sampled_with(per[b]) for b in benchmarks_of({0: per})))


def table(results: dict[int | str, dict[str, dict]]) -> list[str]:
    """The Markdown table: a row per model/step; accuracy (Avg@n, %) and length (mean ± std) per benchmark,
    and what sampled it."""
    benches = benchmarks_of(results)
    head = ["Model"]
    for b in benches:
        ns = sorted({per[b]["samples_per_problem"] for per in results.values() if b in per})
        head += [f"{display(b)} (Avg@{'/'.join(map(str, ns))})", f"{display(b)} length"]
    head.append("Sampled with")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for what, per in results.items():
        cells = [row_name(what, next(iter(per.values()), None))]
        for b in benches:
            s = per.get(b)
            cells += ([f"{100 * s['avg_at_n']:.1f}", f"{s['length_mean']:.0f} ± {s['length_std']:.0f}"]
                      if s else ["–", "–"])
        cells.append(stacks_of(per))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Accuracy: the mean reward over all samples (pass@1 averaged over the n samples of each "
                        "problem), in %. Length: completion tokens, mean ± standard deviation over all samples. "
                        "Sampled with: the inference backend, the vLLM, torch and transformers that served, and "
                        "the sampling seed; AIME numbers move with the vLLM version and the seed."]


def raw_lines(results: dict[int | str, dict[str, dict]]) -> list[str]:
    """The ``Evaluated ...`` line of every result, prefixed with its step."""
    return [f"{'base' if what == BASE_EVAL else f'step {what}'}: {per[b]['line']}"
            for what, per in results.items() for b in benchmarks_of(results) if b in per]


def markdown(store: RunStore, results: dict[int | str, dict[str, dict]]) -> str:
    """report.md: the table, then the raw lines."""
    return "\n".join([f"# Evals of run '{store.run}' stage {store.stage}", "", *table(results), "", "```",
                      *raw_lines(results), "```", ""])


def plot(store: RunStore, results: dict[int | str, dict[str, dict]]) -> bytes:
    """The PNG: accuracy (top) and mean completion length ± std (bottom) per benchmark column."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    benches = benchmarks_of(results)
    base = results.get(BASE_EVAL, {})
    steps = sorted(w for w in results if w != BASE_EVAL)
    cols = max(1, len(benches))
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 6.6), squeeze=False, sharex="col")
    for j, b in enumerate(benches):
        xs = [s for s in steps if b in results[s]]
        ys = [results[s][b] for s in xs]
        acc, length = axes[0][j], axes[1][j]
        ns = sorted({r["samples_per_problem"] for r in ys + ([base[b]] if b in base else [])})
        acc.set_title(f"{display(b)}  (Avg@{'/'.join(map(str, ns))})", fontsize=11)
        acc_values = [100 * r["avg_at_n"] for r in ys]
        if xs:
            acc.plot(xs, acc_values, marker="o", ms=4, lw=1.6, color="C0", label="trained")
            means = [r["length_mean"] for r in ys]
            stds = [r["length_std"] for r in ys]
            length.plot(xs, means, marker="o", ms=4, lw=1.6, color="C0", label="mean")
            length.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                color="C0", alpha=0.15, lw=0, label="± std")
        refs = list(acc_values)
        if b in base:
            refs.append(100 * base[b]["avg_at_n"])
            acc.axhline(refs[-1], color="0.35", ls=":", lw=1.4, label=f"base {refs[-1]:.1f}%")
            length.axhline(base[b]["length_mean"], color="0.35", ls=":", lw=1.4, label="base mean")
        if b == "aime2024":
            refs.append(O1_PREVIEW_AIME)
            acc.axhline(O1_PREVIEW_AIME, color="C3", ls="--", lw=1.2, label=f"o1-preview {O1_PREVIEW_AIME:.1f}%")
        top = max(5.0, max(refs, default=0) * 1.15)
        acc.set_ylim(-0.025 * top, top)  # a 0% line stays visible above the axis
        length.set_ylim(bottom=0)
        acc.set_ylabel("accuracy (%)" if j == 0 else "")
        length.set_ylabel("completion length (tokens)" if j == 0 else "")
        length.set_xlabel("training step")
        for ax in (acc, length):
            ax.grid(True, color="0.9", lw=0.8)
            ax.set_axisbelow(True)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.margins(x=0.04)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best", framealpha=0.85, edgecolor="none")
    if not benches:
        for ax in axes.flat:
            ax.text(0.5, 0.5, "no evals yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"run '{store.run}', stage {store.stage}", fontsize=12)
    stacks = list(dict.fromkeys(stacks_of(per) for per in results.values()))
    footnote = "sampled with " + (stacks[0] if len(stacks) == 1 else f"{len(stacks)} set-ups (see report.md)")
    fig.text(0.01, 0.005, footnote, fontsize=7, color="0.4", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(store: RunStore) -> tuple[Path, Path]:
    """Write ``evals/report.md`` and ``evals/eval.png`` (atomically) and return their paths."""
    results = summaries(store)
    if not results:
        raise ReportError(f"{store.evals_dir}: no evaluation yet; make them with: python -m deepscaler.eval sweep "
                          f"--output-dir {shlex.quote(str(store.output_dir))} --run {shlex.quote(store.run)} "
                          f"--stage {store.stage} --wait")
    md = atomic_write_text(store.evals_dir / "report.md", markdown(store, results))
    png = atomic_write_bytes(store.evals_dir / "eval.png", plot(store, results))
    return md, png


def report_to_wandb(store: RunStore, png: Path) -> str | None:
    """Log the report to the run's W&B group when the run tracks with W&B (``wandb.project``);
    returns the line that says where it went."""
    if not store.run_yaml.exists():
        return None  # an ad hoc model's evals: no run, no W&B settings
    import sys

    from deepscaler.config import load_config
    from deepscaler.errors import one_line
    from deepscaler.tracking import log_report

    try:
        return log_report(load_config(store.run_yaml), store, summaries(store), png)
    except Exception as e:  # the report is written; W&B is a copy of it
        print(f"warning: the report was not logged to W&B: {one_line(e)}", file=sys.stderr)
        return None
