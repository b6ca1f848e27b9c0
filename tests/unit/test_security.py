"""Security rules that the source itself must keep (fast, no processes):

- nothing from the shared filesystem is unpickled: the package calls no pickle loader (submitit's
  own job pickles are read by submitit, not by this package);
- every entry point that writes under the run dir applies ``run.umask`` (and, in jobs,
  ``HF_HUB_OFFLINE``) through the one helper, ``process.apply_process_settings``;
- ``run.umask`` is validated;
- inference servers bind to one address, never a wildcard.

The end-to-end checks (modes of a tiny run's files, no secret in any output) are in
``tests/integration/test_offline.py``.
"""

from __future__ import annotations

import ast
import configparser
import os
from pathlib import Path

import pytest

from deepscaler.config import ConfigError, load_config
from deepscaler.process import apply_process_settings, umask_bits

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "deepscaler"

# --------------------------------------------------------------------------- no unpickling

# Modules whose loaders run code named by the data (pickle and its relatives).
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pandas"}
# Explicit exceptions: (file relative to the repo, the finding) -> why it is safe. Keep it short;
# a stale entry fails the test, so the list always says what is true today.
ALLOWED: dict[tuple[str, str], str] = {}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for an attribute chain, ``load`` for a bare name, "" otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def unpickling_findings(path: Path) -> list[str]:
    """What in one source file could unpickle data: imports of pickle-family modules,
    ``torch.load`` without ``weights_only=True``, ``np.load`` allowing pickles, ``read_pickle``,
    ``torch.jit.load``, DeepSpeed's pickle-based ``engine.load_checkpoint``, ``weights_only=False``
    and ``trust_remote_code=True`` anywhere (code from a model folder)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load", "torch.serialization.load") and _kw(node, "weights_only") is not True:
                found.append(f"{name}( without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                found.append(f"{name}( with allow_pickle")
            elif last in ("read_pickle", "loads") and name.split(".")[0] in PICKLE_MODULES | {"pd"}:
                found.append(f"{name}(")
            elif name == "torch.jit.load":
                found.append("torch.jit.load(")
            elif last == "load_checkpoint" and isinstance(node.func, ast.Attribute):
                found.append(f"{name}( (DeepSpeed's loader unpickles)")
            if _kw(node, "weights_only") is False:
                found.append(f"{name}( with weights_only=False")
            if _kw(node, "trust_remote_code") not in (None, False):
                found.append(f"{name}( with trust_remote_code")
    return found


def test_the_package_unpickles_nothing():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for finding in unpickling_findings(path):
            found.setdefault((rel, finding), True)
    unexplained = sorted(k for k in found if k not in ALLOWED)
    assert not unexplained, f"loaders that may unpickle shared files: {unexplained}"
    stale = sorted(k for k in ALLOWED if k not in found)
    assert not stale, f"allowlist entries that match nothing any more: {stale}"


@pytest.mark.parametrize("source, finding", [
    ("import pickle\n", "import pickle"),
    ("from joblib import load\n", "from joblib import"),
    ("import torch\ntorch.load(p)\n", "torch.load( without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)\n", "torch.load( without weights_only=True"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)\n", "np.load( with allow_pickle"),
    ("import pandas as pd\npd.read_pickle(p)\n", "pd.read_pickle("),
    ("engine.load_checkpoint(d)\n", "engine.load_checkpoint( (DeepSpeed's loader unpickles)"),
    ("AutoModel.from_pretrained(p, trust_remote_code=True)\n", "AutoModel.from_pretrained( with trust_remote_code"),
])
def test_the_checker_sees_each_kind(tmp_path, source, finding):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert finding in unpickling_findings(path)


def test_the_checker_passes_safe_calls(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch, numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
                    "np.load(p, allow_pickle=False)\nload_checkpoint(path, engine)\n")
    assert unpickling_findings(path) == []


def test_model_weights_load_only_from_safetensors():
    """A pytorch_model.bin dropped into a model folder is never read (it would be unpickled)."""
    source = (PACKAGE / "hf_loading.py").read_text()
    call = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
                and _dotted(n.func) == "AutoModelForCausalLM.from_pretrained")
    assert _kw(call, "use_safetensors") is True


# --------------------------------------------------------------------------- umask and offline per entry point

# Entry points that write nothing under a run dir, so they need no umask; say why.
NO_SETTINGS = {
    "deepscaler.config:main": "prints the resolved config",
    "deepscaler.status:main": "reads metrics and squeue",
    "deepscaler.eval.cli:upload_main": "reads a weights step and uploads it",
}
# Entry points that apply them in the functions they dispatch to (each checked the same way):
# the eval command line's ``run`` (also what a sweep task calls) and ``sweep`` (the submitter).
DISPATCHED = {
    "deepscaler.eval.cli:main": ["deepscaler.eval.run:run_eval", "deepscaler.eval.sweep:sweep"],
}


def _console_scripts() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return [line.split("=", 1)[1].strip() for line in lines]


def _calls_in(module: str, function: str) -> set[str]:
    path = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = function.split(".")
    scope: ast.AST = tree
    for name in names:
        scope = next(n for n in ast.iter_child_nodes(scope)
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    return {_dotted(n.func) for n in ast.walk(scope) if isinstance(n, ast.Call)}


def _applies_settings(script: str) -> bool:
    """The entry point calls apply_process_settings, or calls each function it dispatches to
    (``DISPATCHED``) and each of those calls it."""
    calls = _calls_in(*script.split(":"))
    if "apply_process_settings" in calls:
        return True
    delegates = [d.split(":") for d in DISPATCHED.get(script, [])]
    return bool(delegates) and all(function.split(".")[-1] in calls
                                   and "apply_process_settings" in _calls_in(module, function)
                                   for module, function in delegates)


def test_every_entry_point_applies_the_run_settings():
    scripts = _console_scripts()
    assert "deepscaler.prefetch:main" in scripts
    missing = [s for s in scripts if s not in NO_SETTINGS and not _applies_settings(s)]
    assert not missing, f"entry points that do not call process.apply_process_settings: {missing}"
    assert set(NO_SETTINGS) <= set(scripts)
    # The Slurm job's own entry (submitit's runner calls it), and the eval sweep's submitter.
    assert "apply_process_settings" in _calls_in("deepscaler.slurm.stage_job", "StageJob.__call__")
    assert "apply_process_settings" in _calls_in("deepscaler.eval.sweep", "sweep")
    assert "run_eval" in _calls_in("deepscaler.eval.sweep", "EvalTask.__call__")  # an eval array task


@pytest.mark.parametrize("text, bits", [("0002", 0o002), ("0027", 0o027), ("002", 0o002), ("0077", 0o077),
                                        ("0007", 0o007)])
def test_umask_accepts_octal_that_masks_world_write(text, bits):
    assert umask_bits(text) == bits


@pytest.mark.parametrize("text, why", [
    ("2", "3 or 4 octal digits"),  # YAML read an unquoted 0002 as the integer 2
    ("23", "3 or 4 octal digits"),  # ... and 0027 as 23
    ("0028", "3 or 4 octal digits"),
    ("0o02", "3 or 4 octal digits"),
    ("00002", "3 or 4 octal digits"),
    ("0000", "world-write"),
    ("0020", "world-write"),
    ("0702", "owner"),
])
def test_umask_refuses(text, why):
    with pytest.raises(ValueError, match=why):
        umask_bits(text)


def test_umask_is_checked_with_the_config(tmp_path):
    assert load_config(REPO / "yaml/stage1.yaml").run.umask == "0002"
    with pytest.raises(ConfigError, match=r"key 'run.umask' must be 3 or 4 octal digits in quotes.*got '23'"):
        (tmp_path / "x.yaml").write_text("extends: " + str(REPO / "yaml/stage1.yaml") + "\nrun:\n  umask: 0027\n")
        load_config(tmp_path / "x.yaml")
    assert load_config(REPO / "yaml/stage1.yaml", ["run.umask=0027"]).run.umask == "0027"  # typed text stays


def test_apply_process_settings(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    old = os.umask(0o022)
    try:
        apply_process_settings(load_config(REPO / "yaml/stage1.yaml", ["run.umask=0027"]), job=False)
        assert os.umask(0o022) == 0o027 and "HF_HUB_OFFLINE" not in os.environ  # the login node stays online
        apply_process_settings(load_config(REPO / "yaml/stage1.yaml"))
        assert os.umask(0o022) == 0o002 and os.environ["HF_HUB_OFFLINE"] == "1"
        monkeypatch.delenv("HF_HUB_OFFLINE")
        apply_process_settings(load_config(REPO / "yaml/stage1.yaml", ["run.hub_offline=false"]))
        assert "HF_HUB_OFFLINE" not in os.environ
    finally:
        os.umask(old)


def test_tensor_files_follow_the_umask(tmp_path):
    """safetensors >= 0.8 creates its files 0600 whatever the umask; the store's writer (rollouts,
    checkpoints) and the tiny model's builder give them the umask's mode, so the group can read."""
    import torch

    from deepscaler.config import TinyModelConfig
    from deepscaler.safetensors_io import save_tensors
    from deepscaler.store import current_umask
    from deepscaler.tiny import ensure_tiny_model

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        path = save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
        folder = ensure_tiny_model(tmp_path / "cache", TinyModelConfig(hidden_size=64, num_heads=2, num_kv_heads=1,
                                                                        intermediate_size=64, vocab_size=512))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes


# --------------------------------------------------------------------------- servers


def test_servers_bind_one_address_never_a_wildcard(monkeypatch):
    """Outside Slurm the loopback; inside a job this node's address (other nodes must reach it),
    never 0.0.0.0. Requests also need the per-run token (tests/integration/test_inference_hf.py)."""
    from deepscaler.inference.server import default_host

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert default_host() == "127.0.0.1"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    host = default_host()
    assert host not in ("0.0.0.0", "", "::") and host.count(".") == 3


def test_the_launcher_gives_each_attempt_a_fresh_token_and_offline_children(tmp_path, monkeypatch):
    import sys

    from deepscaler.launch import TOKEN_ENV, run_stage

    monkeypatch.setenv(TOKEN_ENV, "planted-by-the-environment")
    seen = tmp_path / "seen.txt"
    record = f"import os; open({str(seen)!r}, 'a').write(os.environ[{TOKEN_ENV!r}] + ' ' + os.environ['HF_HUB_OFFLINE'] + '\\n')"

    def commands(cfg, run_yaml, resume):
        return {"trainer": [sys.executable, "-c", record], "orchestrator": [sys.executable, "-c", "pass"]}

    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"], [f"run.output_dir={tmp_path}"])
    for attempt in range(2):
        run_stage(cfg, "latest", commands=commands, display=_Quiet())
    tokens = [line.split() for line in seen.read_text().splitlines()]
    assert [offline for _, offline in tokens] == ["1", "1"]
    assert tokens[0][0] != tokens[1][0] and "planted-by-the-environment" not in seen.read_text()
    assert all(len(token) == 32 for token, _ in tokens)


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, records):
        pass
