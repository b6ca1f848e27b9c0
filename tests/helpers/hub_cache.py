"""The Hugging Face Hub, the one boundary the tests cannot reach, stood in for twice (no tests here):

- :func:`write_snapshot` lays files out exactly as huggingface_hub caches them
  (``models--org--name/{blobs,snapshots/<commit>,refs/main}``, snapshot files as relative links
  into ``blobs/``), so the code under test reads a real cache layout;
- :class:`FakeHub` replaces ``huggingface_hub.snapshot_download`` only: it "downloads" from
  local folders into that layout and records each call. Nothing else of huggingface_hub is faked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def repo_folder(cache: Path, repo_type: str, repo_id: str) -> Path:
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def write_snapshot(cache: Path, repo_type: str, repo_id: str, source: Path, commit: str = COMMIT,
                   ref: str | None = "main", patterns: list[str] | None = None) -> Path:
    """Copy ``source``'s files into the cache as the Hub would, return the snapshot folder."""
    repo = repo_folder(cache, repo_type, repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source).rglob("*")):
        rel = path.relative_to(source).as_posix()
        if not path.is_file() or (patterns and not any(fnmatch.fnmatch(rel, p) for p in patterns)):
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as the Hub writes it
    return snapshot


class FakeHub:
    """A named fake of ``huggingface_hub.snapshot_download``: serves ``repos[(type, id)] =
    (folder, commit)``; the calls it got are in ``calls``."""

    def __init__(self, repos: dict[tuple[str, str], tuple[Path, str]]):
        self.repos = repos
        self.calls: list[dict] = []

    def snapshot_download(self, repo_id, *, repo_type=None, revision=None, cache_dir=None, allow_patterns=None,
                          local_files_only=False, **kwargs):
        repo_type = repo_type or "model"
        self.calls.append({"repo_id": repo_id, "repo_type": repo_type, "revision": revision,
                           "cache_dir": cache_dir, "allow_patterns": allow_patterns})
        if local_files_only or (repo_type, repo_id) not in self.repos:
            raise FileNotFoundError(f"404 Client Error: repository {repo_id} not found")
        source, commit = self.repos[(repo_type, repo_id)]
        is_commit = revision is not None and len(revision) == 40
        return str(write_snapshot(Path(cache_dir), repo_type, repo_id, source, revision if is_commit else commit,
                                  ref=None if is_commit else (revision or "main"), patterns=allow_patterns))


def tiny_model_folder(root: Path, shard_size: str | None = "1MB") -> Path:
    """The tiny preset's model and tokenizer as a Hub model repository would hold them:
    safetensors shards with their index (``shard_size``), config, tokenizer files."""
    from deepscaler.config import TinyModelConfig
    from deepscaler.tiny import ensure_tiny_model

    built = ensure_tiny_model(Path(root) / "build", TinyModelConfig())
    folder = Path(root) / "repo"
    if shard_size is None:
        shutil.copytree(built, folder)
        return folder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(built))
    model.save_pretrained(str(folder), max_shard_size=shard_size)
    for path in built.iterdir():
        if not path.name.endswith(".safetensors") and not (folder / path.name).exists():
            shutil.copy(path, folder / path.name)
    return folder
