"""The offline Hub cache: what a job needs, the one-line error when a file is missing, and the
prefetch command, which also prepares the tiny model (loading never builds it). The Hub itself is the untested boundary: caches are built here in its layout
(``tests/helpers/hub_cache.py``), and the download call meets ``FakeHub`` only."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from pathlib import Path

import pytest

from deepscaler import prefetch as pf
from deepscaler.config import load_config
from deepscaler.store import read_json
from tests.helpers.hub_cache import COMMIT, OTHER_COMMIT, FakeHub, repo_folder, tiny_model_folder, write_snapshot

REPO = Path(__file__).resolve().parents[2]
MODEL = "fake-org/Tiny-R1"
DATASET = "fake-org/Tiny-Math"
RECORDS = [{"problem": "What is $1+1$?", "answer": "2"}, {"problem": "What is $2+2$?", "answer": "4"}]


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory) -> Path:
    """What the Hub holds for MODEL: the tiny model in 4 safetensors shards, its index, config, tokenizer."""
    return tiny_model_folder(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def dataset_repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub-data")
    (folder / "deepscaler.json").write_text(json.dumps(RECORDS))
    (folder / "README.md").write_text("# a dataset card")
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (the Hub is unreachable here anyway)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def keep_umask():
    """submit and prefetch set the run's umask on the process: give the test's back."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def config(out: Path, *overrides: str, stage: int = 1):
    return load_config([REPO / f"yaml/stage{stage}.yaml", REPO / "yaml/tiny-random.yaml"],
                       [f"run.output_dir={out}", f"model.name={MODEL}", f"data.train={DATASET}", *overrides])


def fill(cache: Path, model_repo: Path, dataset_repo: Path) -> Path:
    """A complete cache, as prefetch leaves it; returns the model's snapshot folder."""
    write_snapshot(cache, "dataset", DATASET, dataset_repo)
    return write_snapshot(cache, "model", MODEL, model_repo)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- what a config needs


def test_hub_ids_are_told_from_local_sources(tmp_path):
    cfg = config(tmp_path)
    assert pf.hub_model(cfg) == pf.HubRepo(MODEL, "model", None)
    assert pf.hub_dataset(cfg) == pf.HubRepo(DATASET, "dataset", None)
    tiny = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"])
    assert pf.hub_repos(tiny) == []  # the tiny preset needs nothing: built model, bundled data
    local = config(tmp_path, f"model.name={tmp_path}", f"data.train={tmp_path}")
    assert pf.hub_repos(local) == []
    assert pf.hub_model(config(tmp_path, "model.name=/nonexistent/model")) is None  # a path, not an id
    assert pf.hub_model(config(tmp_path, "model.revision=v2")).folder_name == "models--fake-org--Tiny-R1"


# --------------------------------------------------------------------------- complete and incomplete caches


def test_a_complete_cache_loads_offline_through_model_source(tmp_path, model_repo, dataset_repo, monkeypatch,
                                                             no_network):
    from deepscaler.data import load_problems
    from deepscaler.hf_loading import load_causal_lm, load_tokenizer, model_source
    from deepscaler.store import cache_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config(tmp_path)
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    states = pf.require_cache(cfg)
    assert states["model"].commit == states["dataset"].commit == COMMIT
    source = model_source(cfg)
    assert source == str(snapshot)  # every process reads the files of this one folder
    tokenizer = load_tokenizer(source, cfg.model.revision)
    model = load_causal_lm(source, "float32", cfg.model.revision)
    assert model.config.vocab_size == len(tokenizer) == cfg.model.tiny.vocab_size
    problems, _ = load_problems(cfg.data.train, cache_dir=str(cache_dir(cfg)))  # the orchestrator's call
    assert [p.answer for p in problems] == ["2", "4"]


def test_a_commit_revision_needs_no_ref(tmp_path, model_repo, no_network):
    cfg = config(tmp_path, f"model.revision={OTHER_COMMIT}", "data.train=bundled:aime")
    write_snapshot(tmp_path / "cache", "model", MODEL, model_repo, commit=OTHER_COMMIT, ref=None)
    assert pf.require_cache(cfg)["model"].snapshot.name == OTHER_COMMIT
    with pytest.raises(pf.CacheError, match=r"no model fake-org/Tiny-R1@v3 \(no .*/refs/v3\)"):
        pf.require_cache(config(tmp_path, "model.revision=v3", "data.train=bundled:aime"))


@pytest.mark.parametrize("lost", ["model-00003-of-00004.safetensors", "tokenizer.json", "config.json",
                                  "tokenizer_config.json"])
def test_a_missing_file_is_named_with_the_command_that_fetches_it(tmp_path, model_repo, dataset_repo, lost):
    cfg = config(tmp_path)
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    (snapshot / lost).unlink()
    with pytest.raises(pf.CacheError) as e:
        pf.require_cache(cfg)
    message = one_line(e)
    assert message.startswith(f"the Hub cache lacks {snapshot / lost} of model {MODEL}@main (commit {COMMIT}); ")
    assert message.endswith("fetch it on the login node with: " + pf.prefetch_command(cfg))


def test_a_deleted_blob_counts_as_missing(tmp_path, model_repo, dataset_repo):
    """The snapshot's link still exists but the blob it points to was deleted (a cache cleaner)."""
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    (snapshot / "model-00001-of-00004.safetensors").resolve().unlink()
    with pytest.raises(pf.CacheError, match="lacks .*/model-00001-of-00004.safetensors of model"):
        pf.require_cache(config(tmp_path))


def test_an_unsharded_model_needs_model_safetensors(tmp_path, model_repo, dataset_repo):
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    (snapshot / "model.safetensors.index.json").unlink()
    with pytest.raises(pf.CacheError, match=r"lacks \S+/model.safetensors of model"):
        pf.require_cache(config(tmp_path))


def test_missing_model_or_dataset(tmp_path, model_repo, dataset_repo):
    cfg = config(tmp_path)
    with pytest.raises(pf.CacheError) as e:
        pf.require_cache(cfg)
    assert one_line(e).startswith(f"the Hub cache has no model {MODEL}@main "
                                  f"(no {tmp_path}/cache/models--fake-org--Tiny-R1/refs/main); ")
    write_snapshot(tmp_path / "cache", "model", MODEL, model_repo)
    with pytest.raises(pf.CacheError, match=f"has no dataset {DATASET}@main"):
        pf.require_cache(cfg)
    pf.require_cache(cfg, data=False)  # what an eval of the base model needs
    write_snapshot(tmp_path / "cache", "dataset", DATASET, dataset_repo, patterns=["*.md"])
    with pytest.raises(pf.CacheError, match=r"lacks .*/snapshots/\w+/ \(no .json, .jsonl, .parquet data file\)"):
        pf.require_cache(cfg)


def test_online_mode_checks_nothing_and_downloads_into_the_cache_dir(tmp_path, model_repo, monkeypatch):
    """run.hub_offline=false: each process fetches what it misses, into data.cache_dir (not ~/.cache)."""
    from deepscaler.hf_loading import model_source

    hub = FakeHub({("model", MODEL): (model_repo, COMMIT)})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    cfg = config(tmp_path, "run.hub_offline=false", f"data.cache_dir={tmp_path / 'shared-cache'}")
    assert pf.require_cache(cfg) == {}
    assert model_source(cfg) == str(repo_folder(tmp_path / "shared-cache", "model", MODEL) / "snapshots" / COMMIT)
    assert hub.calls[0]["cache_dir"] == str(tmp_path / "shared-cache")


# --------------------------------------------------------------------------- the command


def test_the_command_in_the_message_names_exactly_this_config(tmp_path, monkeypatch):
    """Whatever presets and overrides made the config, the printed command rebuilds the values
    that decide what is fetched and where (and the run that records it)."""
    cfg = config(tmp_path / "out dir", "model.revision=v1.0", f"data.cache_dir={tmp_path}/c", "run.name=exp1",
                 stage=2)
    argv = shlex.split(pf.prefetch_command(cfg))
    assert argv[:5] == ["python", "-m", "deepscaler.prefetch", "--stage", "2"]
    seen = {}

    def capture(c, refresh=False, echo=print):  # stops before the download: the Hub (the boundary)
        seen["cfg"] = c
        raise pf.CacheError("stop here")

    monkeypatch.setattr(pf, "prefetch", capture)
    assert pf.main(argv[3:]) == 2
    got = seen["cfg"]
    for key in ("run.output_dir", "run.name", "run.stage", "model.name", "model.revision", "data.train",
                "data.cache_dir"):
        section, name = key.split(".")
        assert getattr(getattr(got, section), name) == getattr(getattr(cfg, section), name), key
    plain = config(tmp_path, stage=1)
    assert pf.prefetch_command(plain) == (f"python -m deepscaler.prefetch --stage 1 --output-dir {tmp_path} "
                                          f"run.name=tiny model.name={MODEL} data.train={DATASET}")


# --------------------------------------------------------------------------- prefetch


def test_prefetch_downloads_through_snapshot_download_and_records_commits(tmp_path, model_repo, dataset_repo,
                                                                          monkeypatch, capsys):
    hub = FakeHub({("model", MODEL): (model_repo, COMMIT), ("dataset", DATASET): (dataset_repo, OTHER_COMMIT)})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    argv = ["--stage", "1", "--preset", "tiny-random", "--output-dir", str(tmp_path), f"model.name={MODEL}",
            f"data.train={DATASET}"]
    assert pf.main(argv) == 0, capsys.readouterr().err
    assert [(c["repo_type"], c["repo_id"], c["revision"], c["cache_dir"]) for c in hub.calls] == [
        ("model", MODEL, None, str(tmp_path / "cache")), ("dataset", DATASET, None, str(tmp_path / "cache"))]
    assert "*.safetensors" in hub.calls[0]["allow_patterns"] and "*.bin" not in hub.calls[0]["allow_patterns"]
    record = read_json(tmp_path / "tiny" / "stage1" / "prefetch.json")
    assert (record["model"]["commit"], record["data"]["commit"]) == (COMMIT, OTHER_COMMIT)
    assert record["model"]["downloaded"] and record["model"]["files"] == 10
    assert record["cache_dir"] == str((tmp_path / "cache").resolve())
    pf.require_cache(config(tmp_path))  # what submit checks now passes


def test_prefetch_of_a_complete_cache_needs_no_network(tmp_path, model_repo, dataset_repo, no_network, monkeypatch,
                                                       capsys):
    hub = FakeHub({})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    fill(tmp_path / "cache", model_repo, dataset_repo)
    argv = ["--stage", "1", "--preset", "tiny-random", "--output-dir", str(tmp_path), f"model.name={MODEL}",
            f"data.train={DATASET}"]
    assert pf.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"model {MODEL}@main: already complete (commit {COMMIT})" in out
    record = read_json(tmp_path / "tiny" / "stage1" / "prefetch.json")
    assert record["model"]["downloaded"] is False and record["data"]["commit"] == COMMIT
    assert hub.calls == []


def test_prefetch_refresh_and_repair(tmp_path, model_repo, dataset_repo, monkeypatch, capsys):
    """--refresh re-resolves main; an incomplete snapshot is fetched again."""
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    (snapshot / "tokenizer.json").unlink()
    hub = FakeHub({("model", MODEL): (model_repo, OTHER_COMMIT), ("dataset", DATASET): (dataset_repo, COMMIT)})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    argv = ["--output-dir", str(tmp_path), "--preset", "tiny-random", f"model.name={MODEL}", f"data.train={DATASET}"]
    assert pf.main(argv) == 0, capsys.readouterr().err
    assert [c["repo_type"] for c in hub.calls] == ["model"]  # the complete dataset was left alone
    assert pf.require_cache(config(tmp_path))["model"].commit == OTHER_COMMIT  # main moved on the Hub
    assert pf.main([*argv, "--refresh"]) == 0
    assert [c["repo_type"] for c in hub.calls] == ["model", "model", "dataset"]


def test_prefetch_errors_are_one_line(tmp_path, monkeypatch, capsys):
    hub = FakeHub({})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    assert pf.main(["--output-dir", str(tmp_path), f"model.name={MODEL}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: cannot download model {MODEL}@main into {tmp_path}/cache: FileNotFoundError: 404")


def test_prefetch_refuses_a_model_without_safetensors(tmp_path, model_repo, monkeypatch, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(model_repo, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    (pickled / "pytorch_model.bin").write_bytes(b"not fetched")
    hub = FakeHub({("model", MODEL): (pickled, COMMIT)})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    assert pf.main(["--output-dir", str(tmp_path), f"model.name={MODEL}", "data.train=bundled:aime"]) == 2
    assert "was downloaded but lacks" in capsys.readouterr().err
    assert not list((tmp_path / "cache").rglob("*.bin"))


# --------------------------------------------------------------------------- submit and the job refuse


@pytest.mark.slurm
def test_submit_refuses_before_anything_is_submitted(tmp_path, slurm_cluster, capsys):
    """Against the real local Slurm (its sbatch, as on a login node): a submitted job would
    have written its run.yaml under the output dir, and none is there."""
    from deepscaler import submit

    argv = ["--stage", "1", "--output-dir", str(tmp_path), "--executor", "slurm"]
    assert submit.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == (f"error: the Hub cache has no model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B@main (no "
                   f"{tmp_path}/cache/models--deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B/refs/main); fetch it on "
                   f"the login node with: python -m deepscaler.prefetch --stage 1 --output-dir {tmp_path}\n")
    assert not (tmp_path / "deepscaler").exists()  # not even run.yaml was written
    assert submit.main([*argv, "--dry-run"]) == 0  # a dry run warns in its output
    assert "# warning: the Hub cache has no model" in capsys.readouterr().out


def test_the_job_checks_again_at_start_with_the_same_message(tmp_path, model_repo, dataset_repo):
    """The cache was complete at submit and lost a shard before the job started: the stage
    supervisor (local, or StageJob in Slurm) fails before it starts any process."""
    from deepscaler.launch import run_stage

    cfg = config(tmp_path)
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    pf.require_cache(cfg)  # what submit saw
    (snapshot / "model-00002-of-00004.safetensors").resolve().unlink()
    with pytest.raises(pf.CacheError) as at_submit:
        pf.require_cache(cfg)

    def commands(*args):
        raise AssertionError("a process was started")

    with pytest.raises(pf.CacheError) as at_start:
        run_stage(cfg, commands=commands)
    assert str(at_start.value) == str(at_submit.value)
    assert "model-00002-of-00004.safetensors" in str(at_start.value)


def test_every_process_fails_on_the_same_message(tmp_path, model_repo, dataset_repo, monkeypatch):
    """Trainer, servers, orchestrator and eval resolve the model through model_source."""
    from deepscaler.hf_loading import model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config(tmp_path)
    snapshot = fill(tmp_path / "cache", model_repo, dataset_repo)
    (snapshot / "tokenizer.json").unlink()
    with pytest.raises(pf.CacheError) as e:
        model_source(cfg)
    with pytest.raises(pf.CacheError) as again:
        pf.require_cache(cfg)
    assert str(e.value) == str(again.value)


# --------------------------------------------------------------------------- the tiny model

# A small tiny model with a seed of its own: the folder hashes shape and seed, so the command
# in the error must carry them.
SMALL_TINY = ["model.name=tiny", "run.seed=3", "model.tiny.hidden_size=64", "model.tiny.num_heads=2",
              "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=128"]


def tiny_config(out: Path):
    return load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"],
                       [f"run.output_dir={out}", *SMALL_TINY])


def test_loading_the_tiny_model_builds_nothing_and_names_the_step_that_does(tmp_path, capsys):
    """model_source only resolves: before the tiny model is prepared it is a one-line error,
    and its command prepares exactly this model (shape and seed), which then loads."""
    from deepscaler.hf_loading import model_source

    cfg = tiny_config(tmp_path)
    with pytest.raises(pf.CacheError) as e:
        model_source(cfg)
    message = str(e.value)
    assert "\n" not in message and message.startswith("the tiny model is not built (")
    assert not (tmp_path / "cache").exists()  # loading wrote nothing
    argv = shlex.split(message.split("build it with: ")[1])
    assert "run.seed=3" in argv and "model.tiny.hidden_size=64" in argv
    assert pf.main(argv[3:]) == 0
    assert "tiny model: ready in" in capsys.readouterr().out
    assert model_source(cfg) == str(pf.prepare_model(cfg))  # prepared once: a second call finds it
    assert Path(model_source(cfg), "config.json").is_file()


def test_the_launcher_prepares_the_tiny_model_before_any_process_starts(tmp_path):
    from deepscaler.hf_loading import model_source
    from deepscaler.launch import run_stage

    cfg = tiny_config(tmp_path)
    loaded = []

    class Started(Exception):
        pass

    def commands(c, *args):
        loaded.append(model_source(c))  # what each process does first
        raise Started

    with pytest.raises(Started):
        run_stage(cfg, commands=commands)
    assert loaded and Path(loaded[0], "model.safetensors").is_file()
