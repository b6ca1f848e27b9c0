"""The tiny RL loop as a cluster job runs it: offline against a prefetched Hub cache, with secrets
in its environment and a strict inherited umask. One run (~1 min) answers three questions:

- do the server, the orchestrator and the trainer all load the model and the data from the
  cache in the Hub's own layout, with ``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME``?
- does any secret of the environment (``HF_TOKEN``, ``WANDB_API_KEY`` and friends, the servers'
  bearer token) reach a file of the run (the offline W&B run's files included), the sbatch
  script of ``--dry-run``, or the command's output?
- does the run keep the strict umask (0077) its user runs with: ``run.umask`` ("0027") only
  ever adds bits, so no file or folder of the run is readable by the group or others? (The
  floor it gives a careless umask: tests/unit/test_security.py, and the Slurm stages of
  tests/integration/test_slurm_stage.py under 0077 and 0022.)

The Hub is the untested boundary: the cache is written by the test (``tests/helpers/hub_cache.py``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler.data import BUNDLED_DIR, read_records
from deepscaler.store import RunStore
from tests.helpers.hub_cache import COMMIT, tiny_model_folder, write_snapshot

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
MODEL, DATASET = "fake-org/Tiny-R1", "fake-org/Tiny-Math"
# What a user's environment may hold; none of it may be written anywhere.
SECRETS = {
    "HF_TOKEN": "hf_PLANTEDsecretHFtoken0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDlegacyHubToken98765",
    "DEEPSCALER_SERVER_TOKEN": "PLANTEDserverTokenFromTheEnv42",
    "WANDB_API_KEY": "PLANTEDwandbKey0000111122223333",
}
# The per-attempt bearer token the launcher generates, made known to the test: the command runs
# through a wrapper that fixes what secrets.token_hex returns in the launcher.
LAUNCH_TOKEN = "feedface" * 4
WRAPPER = (f"import secrets, sys; secrets.token_hex = lambda n=32: {LAUNCH_TOKEN!r}; "
           "from deepscaler.submit import main; sys.exit(main(sys.argv[1:]))")
UMASK = "0027"


def submit(out: Path, *args: str, timeout: int = 600, umask: int = 0) -> subprocess.CompletedProcess:
    """``umask``: the one the command inherits (default 0, a careless login shell: 0666/0777)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "DEEPSCALER_FAULT")}
    env.update(SECRETS, HF_HOME=str(out / "hf-home"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", WRAPPER, "--stage", "1", "--preset", "tiny-random", "--output-dir", str(out),
                           f"model.name={MODEL}", f"data.train={DATASET}", f"run.umask={UMASK}", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
                          preexec_fn=lambda: os.umask(umask))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline")
    cache = out / "cache"  # data.cache_dir's default: <output_dir>/cache
    write_snapshot(cache, "model", MODEL, tiny_model_folder(tmp_path_factory.mktemp("hub")))
    data = tmp_path_factory.mktemp("hub-data")
    (data / "train.json").write_text(json.dumps(read_records(BUNDLED_DIR / "train" / "math.json")[:32]))
    write_snapshot(cache, "dataset", DATASET, data)
    dry = submit(out, "--executor", "slurm", "--dry-run", "slurm.partition=gpu")
    run = submit(out, "--executor", "local", "--max-steps", "2", "--wandb.project", "deepscaler", "wandb.mode=offline",
                 umask=0o077)
    return out, run, dry


def test_the_loop_runs_offline_from_the_hub_cache(offline_run):
    out, run, dry = offline_run
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert dry.returncode == 0 and "# warning" not in dry.stdout, dry.stderr
    store = RunStore(out, "tiny", 1)
    assert store.latest_stable("weights") == 2
    snapshot = out / "cache" / "models--fake-org--Tiny-R1" / "snapshots" / COMMIT
    assert f"on the base model {snapshot}" in (store.logs_dir / "server0.log").read_text()
    problems = [r for r in store.read_metrics().records if r.get("source") == "orchestrator" and "problem_ids" in r]
    assert problems and all(p.startswith(f"{DATASET}/train/") for r in problems for p in r["problem_ids"])
    assert not (out / "hf-home").exists()  # nothing went to the default Hugging Face cache


def test_no_secret_reaches_any_file_or_output(offline_run):
    out, run, dry = offline_run
    needles = [v.encode() for v in (*SECRETS.values(), LAUNCH_TOKEN)]
    outputs = {"run stdout": run.stdout, "run stderr": run.stderr, "dry-run stdout": dry.stdout,
               "dry-run stderr": dry.stderr}
    leaks = [f"{name}: {n.decode()}" for name, text in outputs.items() for n in needles if n in text.encode()]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "run.yaml" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    assert any(p.name == "server0.log" for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        leaks += [f"{path}: {n.decode()}" for n in needles if n in data]
    assert "#SBATCH" in dry.stdout  # the script was printed, and searched
    assert not leaks, leaks


def test_run_files_keep_the_users_strict_umask(offline_run):
    out, run, _ = offline_run
    assert run.returncode == 0
    run_dir = out / "tiny"
    bad, count = [], 0
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        count += 1
        # umask 0077 | run.umask 0027: the owner's alone, never loosened to the group's reading.
        if mode & 0o077:
            bad.append(f"{oct(mode & 0o777)} {path}")
    assert count > 30 and not bad, bad[:20]
    assert (run_dir / "stage1" / "run.yaml").stat().st_mode & 0o777 == 0o600
    assert (run_dir / "stage1" / "weights").stat().st_mode & 0o777 == 0o700
