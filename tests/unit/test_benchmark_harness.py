"""benchmarks/: each benchmark runs as ``python -m benchmarks.<name>`` (no sys.path edits) and
records its figures with the machine, the commit and the config; a later run compares
against the baseline kept for it (issue 23, finding 6)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from benchmarks import harness

BENCHMARKS = Path(harness.__file__).parent
HELPERS = {"__init__", "harness", "_toy"}


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(harness, "BASELINES", tmp_path / "baselines")
    monkeypatch.setattr(harness, "HERE", tmp_path)
    return tmp_path


def test_a_run_is_recorded_with_machine_commit_and_config_then_compared_with_its_kept_baseline(dirs, capsys):
    first = harness.record("demo", {"n": 10, "dir": Path("/x")}, {"per_s": 100.0, "passed": True})
    assert first["machine"]["cpus"] >= 1 and first["commit"] and first["config"] == {"n": 10, "dir": "/x"}
    assert "vs_baseline" not in first and "no baseline" in capsys.readouterr().err  # none kept yet
    assert harness.main(["keep", "demo"]) == 0
    second = harness.record("demo", {"n": 10, "dir": Path("/x")}, {"per_s": 50.0, "passed": True})
    assert second["vs_baseline"] == {"per_s": 0.5}  # a bool is no figure to divide
    err = capsys.readouterr().err
    assert "per_s x0.5" in err and "not the same" not in err
    harness.record("demo", {"n": 20}, {"per_s": 50.0})
    assert "not the same config" in capsys.readouterr().err
    lines = (dirs / "results" / "demo.jsonl").read_text().splitlines()
    assert [json.loads(line)["figures"]["per_s"] for line in lines] == [100.0, 50.0, 50.0]


def test_keep_refuses_a_benchmark_never_run(dirs, capsys):
    assert harness.main(["keep", "never"]) == 2
    assert "error: no recorded run of never" in capsys.readouterr().err


def test_every_benchmark_imports_as_a_module_and_records_its_figures():
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in HELPERS)
    assert names, "no benchmark found"
    for name in names:
        text = (BENCHMARKS / f"{name}.py").read_text(encoding="utf-8")
        assert "sys.path" not in text, f"benchmarks/{name}.py edits sys.path: run it as python -m benchmarks.{name}"
        calls = [n for n in ast.walk(ast.parse(text))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "record"]
        assert calls and calls[0].args[0].value == name, f"benchmarks/{name}.py does not record(\"{name}\", ...)"
        assert "tests." not in text, f"benchmarks/{name}.py imports the tests: test code belongs in tests/"
