"""``python -m deepscaler.eval upload`` (``deepscaler/eval/hub.py``): the file set, the model
card, the dry run, and the upload against ``FakeHubApi``, a named fake of huggingface_hub's
``HfApi`` (the Hub cannot be reached from here). What the fake cannot show, the real Hub's
acceptance of the commit, stays untested."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepscaler.eval.cli import main, upload_main
from deepscaler.eval.hub import UploadError, model_card, model_files, upload_step
from tests.unit.test_eval_cli import fake_eval, make_run

REPO = Path(__file__).resolve().parents[2]


class FakeHubApi:
    """A fake of ``huggingface_hub.HfApi``'s two methods that an upload calls; records the calls."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.fail = fail

    def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, repo_type, exist_ok))
        if self.fail:
            raise self.fail

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None):
        self.calls.append(("create_commit", repo_id, list(operations), commit_message, repo_type))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"
        return Info()


@pytest.fixture
def store(tmp_path: Path):
    store = make_run(tmp_path, "tiny", (1, 2))
    with store.lease("weights", 2, holder="server0"):
        pass
    (store.step_dir("weights", 2) / ".lease-eval-x").touch()  # a live lease: not part of the model
    for bench in ("math500", "aime2024"):
        fake_eval(store, 2, bench)
        fake_eval(store, "base", bench)
    return store


def test_files_are_the_model_folder_without_the_projects_own(store) -> None:
    assert [rel for rel, _ in model_files(store, 2)] == ["config.json", "model.safetensors"]


def test_card_holds_metadata_eval_table_and_recipe(store) -> None:
    card = model_card(store, 2, "me/tiny-repro")
    assert card.startswith("---\nlicense: mit\n") and "base_model:" not in card  # "tiny" is no Hub id
    assert "# tiny-repro" in card and "weights step 2" in card
    assert "| step 2 | 25.0 | 40 ± 3 | 25.0 | 40 ± 3 |" in card
    assert "| tiny (base) |" in card
    assert "| KL | low_var_kl, coefficient 0.001 |" in card and "8 prompts x 4 samples per step" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-repro")' in card
    assert "Not evaluated yet" in model_card(store, 1, "me/x")


def test_dry_run_lists_files_and_prints_the_card(store, capsys) -> None:
    code = main(["upload", "--output-dir", str(store.output_dir), "--step", "2", "--repo-id", "me/tiny-repro",
                 "--dry-run", "--private"])
    out = capsys.readouterr().out
    assert code == 0
    assert "# would upload 3 files to https://huggingface.co/me/tiny-repro (private):" in out
    assert "config.json" in out and "model.safetensors" in out and "probe.json" not in out
    assert "## Training recipe" in out


def test_upload_is_one_commit_with_files_and_card(store) -> None:
    """What the code computes, checked at the fake Hub (the boundary): the repository, the
    paths and bytes sent (the step's own files, the card), the commit message."""
    with store.write_step("weights", 3) as tmp:  # contents of its own: another step's files would show
        (tmp / "config.json").write_text('{"step": 3}')
        (tmp / "model.safetensors").write_bytes(b"step 3 weights")
    api = FakeHubApi()
    upload_step(store, 3, "me/tiny-repro", private=True, api=api)
    (name, repo, private, kind, exist_ok), commit = api.calls
    assert (name, repo, private, kind, exist_ok) == ("create_repo", "me/tiny-repro", True, "model", True)
    assert (commit[0], commit[1], commit[4]) == ("create_commit", "me/tiny-repro", "model")  # the same repository
    assert [op.path_in_repo for op in commit[2]] == ["config.json", "model.safetensors", "README.md"]
    assert sent(api) == {"config.json": b'{"step": 3}', "model.safetensors": b"step 3 weights",
                         "README.md": model_card(store, 3, "me/tiny-repro").encode()}  # the card, from memory
    assert commit[3] == "deepscaler run tiny stage 1 step 3"


def test_the_url_returned_is_the_hubs_commit_url_or_the_repository(store) -> None:
    class NoUrl(FakeHubApi):
        def create_commit(self, *a, **k):
            super().create_commit(*a, **k)
            return object()  # an older huggingface_hub: no commit_url

    assert upload_step(store, 2, "me/tiny-repro", api=FakeHubApi()) == "https://huggingface.co/me/tiny-repro/commit/abc"
    assert upload_step(store, 2, "me/tiny-repro", api=NoUrl()) == "https://huggingface.co/me/tiny-repro"


def test_hub_errors_are_one_line(store) -> None:
    with pytest.raises(UploadError, match=r"^the Hub refused me/x: RuntimeError: 403 Forbidden: no write access$"):
        upload_step(store, 2, "me/x", private=False, api=FakeHubApi(RuntimeError("403 Forbidden:\n no write access")))


def test_no_token_is_a_one_line_error_and_no_upload(store, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "deepscaler.eval", "upload", "--output-dir", str(store.output_dir),
                           "--step", "2", "--repo-id", "me/tiny-repro"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`"


def test_bad_repo_id_and_step(store, capsys) -> None:
    assert main(["upload", "--output-dir", str(store.output_dir), "--step", "2", "--repo-id", "nope", "--dry-run"]) == 2
    assert "expected owner/name" in capsys.readouterr().err
    # the console script deepscaler-upload: the same subcommand
    assert upload_main(["--output-dir", str(store.output_dir), "--step", "5", "--repo-id", "me/x", "--dry-run"]) == 2
    assert "step_5 does not exist; stable weights steps: [1, 2]" in capsys.readouterr().err


# --------------------------------------------------------------------------- only the step's own files, private by default


def sent(api: FakeHubApi) -> dict[str, bytes]:
    """What the fake Hub received: {path in the repository: content}."""
    ops = next(call for call in api.calls if call[0] == "create_commit")[2]
    return {op.path_in_repo: (op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                              else Path(op.path_or_fileobj).read_bytes()) for op in ops}


def test_only_the_files_of_the_manifest_are_sent(store, tmp_path: Path) -> None:
    """Files that appeared in the step folder after it became stable (planted, or a symlink to
    a secret elsewhere) are not part of the model and never leave the machine."""
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    folder = store.step_dir("weights", 2)
    (folder / "notes.txt").write_text("not the model's")
    (folder / "tokenizer.json").symlink_to(secret)
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"x")
    assert [rel for rel, _ in model_files(store, 2)] == ["config.json", "model.safetensors"]
    api = FakeHubApi()
    upload_step(store, 2, "me/tiny-repro", api=api)
    got = sent(api)
    assert sorted(got) == ["README.md", "config.json", "model.safetensors"]
    assert b"PRIVATE KEY" not in b"".join(got.values())


def test_a_listed_file_that_became_a_symlink_is_refused(store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)  # the size the manifest expects
    folder = store.step_dir("weights", 2)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    api = FakeHubApi()
    with pytest.raises(UploadError, match=rf"^{folder / 'model.safetensors'} is a symlink \(to {secret}\): "
                                          r"an upload sends only the step's own files; refusing$"):
        upload_step(store, 2, "me/tiny-repro", api=api)
    assert api.calls == []  # nothing reached the Hub, not even the repository
    code = main(["upload", "--output-dir", str(store.output_dir), "--step", "2", "--repo-id", "me/x", "--dry-run"])
    assert code == 2


def test_a_symlinked_step_folder_is_refused(store, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    store.step_dir("weights", 2).rename(elsewhere)
    store.step_path("weights", 2).symlink_to(elsewhere)
    with pytest.raises(UploadError, match=r"step_2 is a symlink .*refusing$"):
        upload_step(store, 2, "me/tiny-repro", api=FakeHubApi())


def test_repositories_are_private_unless_public_is_asked_for(store, monkeypatch, capsys) -> None:
    """The command line against the fake Hub (the boundary): private by default; ``--private``
    is still accepted (the default, for old scripts); ``--public`` makes it public."""
    import huggingface_hub

    apis: list[FakeHubApi] = []
    monkeypatch.setenv("HF_TOKEN", "hf_test-token")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token: apis.append(FakeHubApi()) or apis[-1])
    common = ["upload", "--output-dir", str(store.output_dir), "--step", "2", "--repo-id", "me/tiny-repro"]
    for extra in ([], ["--private"], ["--public"]):
        assert main(common + extra) == 0, capsys.readouterr().err
    assert [api.calls[0][2] for api in apis] == [True, True, False]
    assert main(common + ["--dry-run"]) == 0
    assert "(private):" in capsys.readouterr().out
    assert main(common + ["--dry-run", "--public"]) == 0
    assert "(public):" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # both at once: argparse's own one-line error
        main(common + ["--public", "--private"])
