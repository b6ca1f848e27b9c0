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
import re
import configparser
import os
from pathlib import Path

import pytest

from deepscaler.config import ConfigError, load_config
from deepscaler.process import apply_process_settings, umask_bits
from tests.slurm_cluster import in_ci

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


@pytest.mark.parametrize("text, bits", [("0022", 0o022), ("0027", 0o027), ("027", 0o027), ("0077", 0o077),
                                        ("0032", 0o032)])
def test_umask_accepts_octal_that_masks_group_and_world_write(text, bits):
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
    ("0002", "group-write bit: a group member who can write the run could run code as you"),
    ("0007", "group-write"),
    ("002", "group-write"),
])
def test_umask_refuses(text, why):
    with pytest.raises(ValueError, match=why):
        umask_bits(text)


def test_umask_is_checked_with_the_config(tmp_path):
    assert load_config(REPO / "yaml/stage1.yaml").run.umask == "0027"
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
        assert os.umask(0o022) == 0o027 and os.environ["HF_HUB_OFFLINE"] == "1"
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
    from deepscaler.process import current_umask
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


# --------------------------------------------------------------------------- the umask only tightens; private folders


@pytest.mark.parametrize("inherited, configured, effective", [
    (0o077, "0027", 0o077),  # a strict user stays strict: nothing of the run becomes group-readable
    (0o077, "0022", 0o077),
    (0o022, "0027", 0o027),
    (0o002, "0027", 0o027),  # Debian's default for user-private groups: the run stops group-writing
    (0o000, "0027", 0o027),  # a careless shell gets the run's floor
    (0o007, "0022", 0o027),  # the bits of both
])
def test_the_run_umask_never_loosens_the_one_inherited(inherited, configured, effective):
    from deepscaler.process import current_umask

    old = os.umask(inherited)
    try:
        apply_process_settings(load_config(REPO / "yaml/stage1.yaml", [f"run.umask={configured}"]), job=False)
        assert current_umask() == effective
        os.umask(inherited)
        apply_process_settings(load_config(REPO / "yaml/stage1.yaml"), job=False)  # the default, "0027"
        assert current_umask() == inherited | 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_private_dir_is_owner_only_whatever_the_umask(tmp_path):
    from deepscaler.store import private_dir

    old = os.umask(0)  # a careless umask: a plain mkdir would make it 0777
    try:
        made = private_dir(tmp_path / "logs" / "slurm")
    finally:
        os.umask(old)
    assert _mode(made) == 0o700
    loose = tmp_path / "loose"  # what an older version left behind (umask 0002)
    loose.mkdir()
    os.chmod(loose, 0o2775)
    (loose / "1_submitted.pkl").write_bytes(b"x")
    assert private_dir(loose) == loose and _mode(loose) == 0o700
    assert (loose / "1_submitted.pkl").read_bytes() == b"x"  # closed, nothing removed


def test_private_dir_refuses_a_symlink_and_leaves_its_target(tmp_path):
    from deepscaler.store import StoreError, private_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(outside, 0o777)
    link = tmp_path / "logs" / "slurm"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(StoreError, match=rf"^refusing {link} as a private folder: it is a symlink \(to {outside}\)"):
        private_dir(link)
    assert _mode(outside) == 0o777
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="refusing .*file as a private folder: not a directory"):
        private_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder of another user needs root")
def test_private_dir_refuses_a_folder_of_another_user(tmp_path):
    from deepscaler.store import StoreError, private_dir

    theirs = tmp_path / "slurm"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StoreError, match=r"it belongs to uid 65534, not to this user \(uid 0\)"):
        private_dir(theirs)


def test_submit_refuses_a_planted_submitit_folder_before_sbatch(tmp_path):
    """A group member who could write the stage dir plants ``logs/slurm`` as a link to a folder
    of theirs: the submit stops with one line before anything is submitted, and writes no pickle
    there. Needs sbatch only on the PATH (nothing reaches it)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("sbatch") is None:
        (pytest.fail if in_ci() else pytest.skip)("needs sbatch on the PATH (the local cluster's client)")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    slurm = tmp_path / "out" / "tiny" / "stage1" / "logs" / "slurm"
    slurm.parent.mkdir(parents=True)
    slurm.symlink_to(theirs)
    done = subprocess.run([sys.executable, "-m", "deepscaler.submit", "--preset", "tiny-random", "--stage", "1",
                           "--executor", "slurm", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: refusing {slurm} as a private folder: it is a symlink (to {theirs}); "
        "it must be a real folder of this user (docs/security.md)")
    assert list(theirs.iterdir()) == [] and "submitted" not in done.stdout


# --------------------------------------------------------------------------- the stage's server token


def test_the_token_file_is_private_from_its_creation_and_read_back(tmp_path):
    from deepscaler.inference.contract import read_token, token_path, write_token

    old = os.umask(0o002)  # run.umask's default: files would be 0664, folders 0775
    try:
        token = write_token(tmp_path / "stage1")
    finally:
        os.umask(old)
    path = token_path(tmp_path / "stage1")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert read_token(tmp_path / "stage1") == token == read_token(tmp_path / "stage1")  # a requeue reads the same
    assert write_token(tmp_path / "stage1") != token  # a new submit: a new token
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temp file left


@pytest.mark.parametrize("spoil, why", [
    (lambda p: p.chmod(0o640), r"mode 0640"),  # readable by the group
    (lambda p: os.chown(p, 12345, -1), r"owned by uid 12345"),  # a group member's
    (lambda p: p.parent.chmod(0o750), r"folder .*secrets is owned by uid 0 with mode 0750"),
    (lambda p: p.unlink(), r"is missing: the server token is written at submit"),
    (lambda p: p.write_text("not a token\n"), r"does not hold a server token"),
])
def test_a_token_file_others_could_read_or_have_written_is_refused(tmp_path, spoil, why):
    from deepscaler.inference.contract import TokenError, read_token, token_path, write_token

    write_token(tmp_path)
    spoil(token_path(tmp_path))
    with pytest.raises(TokenError, match=why):
        read_token(tmp_path)


def test_a_symlinked_token_file_is_refused(tmp_path):
    from deepscaler.inference.contract import TokenError, read_token, token_path, write_token

    write_token(tmp_path)
    path = token_path(tmp_path)
    (tmp_path / "planted").write_text("0" * 32 + "\n")
    (tmp_path / "planted").chmod(0o600)
    path.unlink()
    path.symlink_to(tmp_path / "planted")
    with pytest.raises(TokenError, match="it must be a plain file"):
        read_token(tmp_path)


def test_the_submit_writes_the_token_and_no_script_holds_it(tmp_path):
    """Both jobs of a two-jobs stage read the token from the file written at submit; the sbatch
    scripts carry none (the real two-jobs stage: tests/integration/test_slurm_stage.py)."""
    from deepscaler.inference.contract import read_token
    from deepscaler.slurm.stage_job import dry_run_script
    from deepscaler.store import RunStore

    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"],
                      [f"run.output_dir={tmp_path}", "slurm.hetjob=false"])
    from deepscaler.inference.contract import write_token

    token = write_token(RunStore(tmp_path, "tiny", 1).root)
    assert read_token(RunStore(tmp_path, "tiny", 1).root) == token
    assert token not in dry_run_script(cfg) and "DEEPSCALER_SERVER_TOKEN" not in dry_run_script(cfg)


@pytest.mark.parametrize("has_token, no_auth, bind, refused", [
    (True, False, "10.1.2.3", None),
    (False, False, "127.0.0.1", "DEEPSCALER_SERVER_TOKEN is not set"),
    (False, False, "10.1.2.3", "DEEPSCALER_SERVER_TOKEN is not set"),
    (False, True, "10.1.2.3", "allowed on a loopback --host only"),
    (False, True, "0.0.0.0", "allowed on a loopback --host only"),
    (False, True, "127.0.0.1", None),
    (False, True, "::1", None),
])
def test_a_server_without_a_token_serves_only_loopback_and_only_when_asked(has_token, no_auth, bind, refused):
    from deepscaler.inference.server import auth_refusal

    found = auth_refusal(has_token, no_auth, bind)
    assert (found is None) if refused is None else (refused in found)


def test_a_server_process_without_a_token_refuses_to_start(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DEEPSCALER_SERVER_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "deepscaler.inference", "--config", str(REPO / "yaml/stage1.yaml"),
                           str(REPO / "yaml/tiny-random.yaml"), "--name", "s", "--weights-step", "base",
                           f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.endswith("error: DEEPSCALER_SERVER_TOKEN is not set: the server will not serve without a token "
                         "(the launchers set it; by hand, set it, or pass --no-auth with --host 127.0.0.1)")


# --------------------------------------------------------------------------- server address files


def _store(tmp_path):
    from deepscaler.store import RunStore

    store = RunStore(tmp_path, "run", 1)
    old = os.umask(0o002)  # run.umask's default
    try:
        store.ensure_dirs()
        store.write_server_address("server0", "127.0.0.1", 8000)
    finally:
        os.umask(old)
    return store


def test_address_files_are_written_so_only_the_owner_can_change_them(tmp_path):
    store = _store(tmp_path)
    assert store.servers_dir.stat().st_mode & 0o777 == 0o755
    assert store.server_file("server0").stat().st_mode & 0o777 == 0o644
    assert store.read_server_addresses() == {"server0": "127.0.0.1:8000"}
    store.servers_dir.chmod(0o775)  # a servers/ that an older version made with the umask
    assert store.read_server_addresses() == {"server0": "127.0.0.1:8000"}
    assert store.servers_dir.stat().st_mode & 0o777 == 0o755  # ours: tightened


@pytest.mark.parametrize("spoil, why", [
    (lambda f: f.chmod(0o664), "writable by group or others (mode 0664)"),
    (lambda f: f.chmod(0o646), "writable by group or others (mode 0646)"),
    (lambda f: os.chown(f, 12345, -1), "owned by uid 12345"),
])
def test_an_address_file_others_could_have_written_is_refused(tmp_path, spoil, why):
    from deepscaler.store import StoreError

    store = _store(tmp_path)
    spoil(store.server_file("server0"))
    with pytest.raises(StoreError, match=f"refusing server address file .*server0.addr: {re.escape(why)}"):
        store.read_server_addresses()


def test_a_symlinked_address_file_or_a_world_writable_folder_of_another_is_refused(tmp_path):
    from deepscaler.store import StoreError

    store = _store(tmp_path)
    (tmp_path / "elsewhere.addr").write_text("10.9.9.9:80\n")
    store.server_file("server1").symlink_to(tmp_path / "elsewhere.addr")
    with pytest.raises(StoreError, match="server1.addr .*it must be a plain file"):
        store.read_server_addresses()
    store.server_file("server1").unlink()
    os.chown(store.servers_dir, 12345, -1)
    store.servers_dir.chmod(0o777)
    with pytest.raises(StoreError, match="servers: anyone may write it"):
        store.read_server_addresses()
    store.servers_dir.chmod(0o775)  # a group member's, as when they evaluate a run of the group's
    assert store.read_server_addresses() == {"server0": "127.0.0.1:8000"}


# --------------------------------------------------------------------------- what one request may cost


def test_the_request_limits_never_refuse_what_the_orchestrator_or_an_eval_sends():
    """Stage 3 (128 prompts of up to 1024 tokens, 16 samples, 24k-token context, R1's 151936
    ids) even if one server got the whole step; an eval sends a whole benchmark at once."""
    import json

    from deepscaler.data import BENCHMARKS, load_benchmark
    from deepscaler.inference.contract import max_model_len
    from deepscaler.inference.server import EVAL_MAX_PROMPTS, RequestLimits

    assert max(len(load_benchmark(name)) for name in BENCHMARKS) <= EVAL_MAX_PROMPTS
    cfg = load_config(REPO / "yaml/stage3.yaml")
    model_len, vocab = max_model_len(cfg), 151936
    limits = RequestLimits.of(cfg, model_len, vocab)

    def body_bytes(prompts: int, tokens: int, n: int) -> int:
        one = json.dumps({"prompts": [[vocab - 1] * tokens], "n": n, "max_tokens": model_len, "temperature": 0.6,
                          "top_p": 1.0, "seed": 2**62})
        return len(one) + (prompts - 1) * (len(json.dumps([vocab - 1] * tokens)) + 2)

    step = cfg.orchestrator.prompts_per_step
    assert step <= limits.max_prompts and step * cfg.sampling.samples_per_prompt <= limits.max_samples
    assert body_bytes(step, cfg.data.max_prompt_tokens, cfg.sampling.samples_per_prompt) <= limits.max_body_bytes
    eval_n = max(b.samples for b in cfg.eval.benchmarks.values())
    assert EVAL_MAX_PROMPTS * eval_n <= limits.max_samples
    assert body_bytes(EVAL_MAX_PROMPTS, model_len - 1, eval_n) <= limits.max_body_bytes
    # ... and the tiny preset's server takes a few MB, not the old fixed 256 MiB.
    tiny = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"])
    assert RequestLimits.of(tiny, max_model_len(tiny), 4096).max_body_bytes < 8 * 2**20


def test_prompts_and_samples_per_request_are_capped():
    from deepscaler.inference.server import RequestError, RequestLimits, parse_generate

    limits = RequestLimits(max_prompts=3, max_samples=8, max_body_bytes=2**20)
    body = {"prompts": [[1, 2]] * 2, "n": 4, "max_tokens": 8, "temperature": 1.0, "top_p": 1.0}
    assert len(parse_generate(body, 16, 10, limits).prompts) == 2  # 2 x 4 = 8: at the limit
    with pytest.raises(RequestError, match=r"^prompts has 4 prompts; this server takes at most 3 per request") as e:
        parse_generate({**body, "prompts": [[1, 2]] * 4, "n": 1}, 16, 10, limits)
    assert e.value.status == 413
    with pytest.raises(RequestError, match=r"^3 prompts x n 4 = 12 samples; this server takes at most 8") as e:
        parse_generate({**body, "prompts": [[1, 2]] * 3}, 16, 10, limits)
    assert e.value.status == 413


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """A real tiny server with a 2 s socket timeout and room for 4 connections."""
    from deepscaler.config import to_yaml
    from deepscaler.prefetch import prepare_model
    from deepscaler.store import RunStore
    from tests.helpers.inference import serve, stop

    root = tmp_path_factory.mktemp("guarded")
    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"], [f"run.output_dir={root}"])
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    store.ensure_dirs()
    store.run_yaml.write_text(to_yaml(cfg))
    prepare_model(cfg)  # the launcher's step before a server starts on the base model
    proc, client = serve(store, "guarded", "--weights-step", "base", "inference.socket_timeout_s=2",
                         "inference.max_connections=4")
    yield client, store
    stop(proc)


def _raw(address: str, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; what the server answers before it closes (or wait_s)."""
    import socket

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_a_request_without_the_token_gets_401(guarded_server):
    client, _ = guarded_server
    answer = _raw(client.address, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert client.health()["name"] == "guarded"  # with the token: served


def test_the_server_proves_it_holds_the_token_for_its_own_address(guarded_server):
    import json

    from deepscaler.inference.contract import hello_proof
    from tests.helpers.inference import TOKEN

    client, _ = guarded_server
    assert client.verified  # the client checked the proof before its first request with the token
    nonce = "ab" * 16
    body = json.dumps({"nonce": nonce}).encode()
    answer = _raw(client.address, b"POST /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
    proof = json.loads(answer.split(b"\r\n\r\n", 1)[1])["proof"]
    assert proof == hello_proof(TOKEN, nonce, client.address) != hello_proof(TOKEN, nonce, "10.0.0.9:1")


def test_the_client_sends_the_token_only_to_a_server_that_proved_it_holds_it(guarded_server):
    """A listener that a forged servers/*.addr names: on its own, and relaying /hello to the
    real server (whose proof names the real address). Neither receives the token."""
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deepscaler.inference.client import InferenceClient, ServerError
    from tests.helpers.inference import TOKEN

    real, _ = guarded_server
    seen: list[str | None] = []

    class Listener(BaseHTTPRequestHandler):
        relay = False

        def do_GET(self):  # noqa: N802
            self.do_POST()

        def do_POST(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer = b'{"proof": "0", "name": "server0"}'
            if self.relay and self.path == "/hello":
                answer = urllib.request.urlopen(urllib.request.Request(
                    f"http://{real.address}/hello", data=body, method="POST"), timeout=10).read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    for relay in (False, True):
        Listener.relay = relay
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Listener)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            forged = InferenceClient("server0", f"127.0.0.1:{httpd.server_address[1]}", token=TOKEN, timeout_s=10)
            with pytest.raises(ServerError, match="did not prove that it holds this run's token"):
                forged.health()
        finally:
            httpd.shutdown()
    assert seen == [None, None] and TOKEN not in repr(seen)


def test_a_body_over_the_limit_is_refused_before_it_is_read(guarded_server):
    client, _ = guarded_server
    from tests.helpers.inference import TOKEN

    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {64 * 2**20}\r\n\r\n").encode()  # under the old fixed 256 MiB; no body follows
    answer = _raw(client.address, head)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"byte limit" in answer


def test_deeply_nested_json_is_a_400_not_a_traceback(guarded_server):
    client, store = guarded_server
    from tests.helpers.inference import TOKEN

    body = b"[" * 100_000 + b"]" * 100_000
    answer = _raw(client.address, (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                   f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"nested too deeply" in answer
    assert "Traceback" not in (store.logs_dir / "guarded.log").read_text()


def test_a_half_sent_request_is_dropped_after_the_socket_timeout(guarded_server):
    """inference.socket_timeout_s = 2 here: the server closes the connection (the promise is
    the bound: 3x margin)."""
    import time

    client, _ = guarded_server
    start = time.monotonic()
    answer = _raw(client.address, b"GET /health HTTP/1.1\r\nHost: x\r\n", wait_s=20)  # headers never end
    assert answer == b"" and time.monotonic() - start < 6


def test_connections_beyond_the_limit_are_answered_503(guarded_server):
    import socket
    import time

    from deepscaler.inference.client import ServerError

    client, _ = guarded_server
    host, port = client.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]  # inference.max_connections
    try:
        assert _raw(client.address, b"").startswith(b"HTTP/1.1 503 ")
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10  # the idle connections' threads end as they see the close
    while True:
        try:
            assert client.health()["name"] == "guarded"
            break
        except ServerError as e:
            assert e.status == 503 and time.monotonic() < deadline, e
            time.sleep(0.1)


def test_only_the_exact_token_is_served(guarded_server):
    """Any other bearer value is a 401: a wrong one, a prefix, one longer, another scheme."""
    client, _ = guarded_server
    token = client.token
    wrong = [token[:-1] + ("0" if token[-1] != "0" else "1"), token[:8], token + "0", "", "x" * len(token)]
    for value in [f"Bearer {w}" for w in wrong] + [f"Basic {token}", token]:
        answer = _raw(client.address, f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: {value}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 401 "), (value.replace(token, "<token>"), answer[:60])
    right = _raw(client.address, f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                                 f"Connection: close\r\n\r\n".encode())
    assert right.startswith(b"HTTP/1.1 200 ")
