"""Helpers shared by the inference integration tests (no tests here): a run directory with
published weights steps, and a real server process started the way the launcher does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from deepscaler.config import Config, load_config, to_yaml
from deepscaler.hf_loading import load_causal_lm, load_tokenizer
from deepscaler.inference.client import InferenceClient, wait_for_servers
from deepscaler.prefetch import prepare_model
from deepscaler.store import RunStore
from deepscaler.trainer.publisher import publish_weights

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a"  # what the launcher would generate per run
PROMPTS = [[3, 2, 101, 202, 303], [3, 2, 7], [3, 2, 1000, 1001, 1002, 1003, 1004, 1005], [3, 2, 42, 42]]


def make_run(root: Path, *overrides: str) -> tuple[Config, RunStore]:
    """A tiny-preset stage directory with weights step 0 (the base model), step 1 (perturbed)
    and step 2 (eos-loving: the first token after PROMPTS[0] is eos, for the finish tests)."""
    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"], [f"run.output_dir={root}", *overrides])
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    store.ensure_dirs()
    store.run_yaml.write_text(to_yaml(cfg))
    source = str(prepare_model(cfg))  # what the launcher does before any process starts
    model, tokenizer = load_causal_lm(source, "float32"), load_tokenizer(source)
    publish_weights(store, 0, model, tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    publish_weights(store, 1, model, tokenizer)
    with torch.no_grad():
        h = model(torch.tensor([PROMPTS[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[tokenizer.eos_token_id] = 200 * h / h.norm() ** 2  # logit 200 after PROMPTS[0]
    publish_weights(store, 2, model, tokenizer)
    return cfg, store


def start_server(store: RunStore, name: str, *args: str, fault: str | None = None,
                 token: str | None = TOKEN) -> subprocess.Popen:
    """``python -m deepscaler.inference`` with its log in logs/<name>.log, as the launcher runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DEEPSCALER_FAULT", None)
    env.pop("DEEPSCALER_SERVER_TOKEN", None)
    if fault:
        env["DEEPSCALER_FAULT"] = fault
    if token:
        env["DEEPSCALER_SERVER_TOKEN"] = token
    store.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(store.logs_dir / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "deepscaler.inference", "--config", str(store.run_yaml), "--name", name, *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )


def serve(store: RunStore, name: str, *args: str, timeout_s: float = 180, **kwargs) -> tuple[subprocess.Popen, InferenceClient]:
    proc = start_server(store, name, *args, **kwargs)
    try:
        client = wait_for_servers(store, [name], timeout_s, procs={name: proc}, token=TOKEN)[name]
    except BaseException:
        stop(proc)
        raise
    return proc, client


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def teacher_forced(folder: Path, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T)[token] of a fresh transformers model over prompt + tokens."""
    model = load_causal_lm(str(folder), "float32").eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
