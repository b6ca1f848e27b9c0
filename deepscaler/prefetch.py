"""``python -m deepscaler.prefetch``: fill the shared Hub cache on the login node, so that jobs
run with ``HF_HUB_OFFLINE=1``; and prepare the tiny preset's model there.

    python -m deepscaler.prefetch --stage 1 [--preset P] [--output-dir D] [--refresh] [key=value ...]

Compute nodes often have no internet, and a job that reaches for the Hub after it got its GPUs
wastes them (or hangs). So the model (config, tokenizer, safetensors at ``model.revision``) and
the training data (``data.train`` when it is a Hub dataset id) are downloaded here, with
huggingface_hub's ``snapshot_download``, into ``data.cache_dir`` (default
``<output_dir>/cache``) on the shared filesystem, in the Hub's own cache layout::

    <cache>/models--org--name/refs/main                 the commit that "main" resolved to
    <cache>/models--org--name/snapshots/<commit>/...    the files (links into blobs/)
    <cache>/datasets--org--name/...

and the resolved commits are recorded in ``<run>/stage<K>/prefetch.json``. With
``run.hub_offline: true`` (the default) every process of a job resolves a Hub id to that
snapshot folder (:func:`model_snapshot`, called by ``deepscaler.hf_loading.model_source``), so the
trainer, the servers, the orchestrator and eval read the same files. ``submit`` checks the
cache before it submits, and the job checks again when it starts (:func:`require_cache`): a
missing file is a one-line error naming it and the prefetch command that fixes it.

A complete snapshot is not downloaded again, so a second prefetch needs no network; pass
``--refresh`` to resolve a branch revision (``main``) anew. Pin ``model.revision`` to a commit
for a reproducible run. The tiny preset needs no Hub: its data is bundled, and its model is built
(and warm-started) into the cache by :func:`prepare_model`, the one step that builds it: the
launcher runs it before a stage's processes start, eval before a base model's servers, and this
command for processes started by hand. Loading only loads: a tiny model not built yet is a one-line CacheError naming
this command (:func:`tiny_model`).
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deepscaler.config import Config, ConfigError, parse_command_line, refuse_repeated_keys, stage_config
from deepscaler.data import is_hub_id
from deepscaler.process import apply_process_settings
from deepscaler.store import cache_dir

PREFETCH_FILE = "prefetch.json"
# What a model snapshot needs: config, tokenizer and safetensors weights; never pickles (*.bin).
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# The tokenizer's data: one of these beside tokenizer_config.json (fast, sentencepiece, BPE).
TOKENIZER_DATA = ("tokenizer.json", "tokenizer.model", "vocab.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class CacheError(ConfigError):
    """A Hub model or dataset that the cache lacks (one line: the file, and the command that fetches it)."""


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str | None  # None: main

    @property
    def ref(self) -> str:
        return self.revision or "main"

    @property
    def folder_name(self) -> str:
        """The Hub cache's folder of the repository (``models--org--name``)."""
        return f"{self.repo_type}s--{self.repo_id.replace('/', '--')}"

    def describe(self) -> str:
        return f"{self.repo_type} {self.repo_id}@{self.ref}"


# --------------------------------------------------------------------------- what a config needs


def hub_model(cfg: Config) -> HubRepo | None:
    """``model.name`` as a Hub repository; None for ``tiny`` and for local folders."""
    name = cfg.model.name
    if name == "tiny" or Path(name).expanduser().exists() or not is_hub_id(name):
        return None
    return HubRepo(name, "model", cfg.model.revision)


def hub_dataset(cfg: Config) -> HubRepo | None:
    """``data.train`` as a Hub dataset (the same test as ``deepscaler.data.load_problems``)."""
    from deepscaler.data import BUNDLED_PREFIX, looks_like_repo_id

    source = cfg.data.train
    if source.startswith(BUNDLED_PREFIX) or Path(source).expanduser().exists() or not looks_like_repo_id(source):
        return None
    return HubRepo(source, "dataset", None)


def hub_repos(cfg: Config) -> list[HubRepo]:
    return [r for r in (hub_model(cfg), hub_dataset(cfg)) if r is not None]


# --------------------------------------------------------------------------- the cache, read locally


def resolve_commit(cache: Path, repo: HubRepo) -> str | None:
    """The commit a revision stands for in the cache: a commit hash itself, else ``refs/<rev>``."""
    if repo.revision and _COMMIT_RE.match(repo.revision):
        return repo.revision
    ref = cache / repo.folder_name / "refs" / repo.ref
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT_RE.match(commit) else None


def missing_files(snapshot: Path, repo: HubRepo) -> list[str]:
    """Files a complete snapshot must hold and this one lacks (a dangling link counts as lacking)."""
    if not snapshot.is_dir():
        return [f"{snapshot}/"]
    if repo.repo_type == "dataset":
        from deepscaler.data import DATA_SUFFIXES, data_files

        return [] if data_files(snapshot) else [f"{snapshot}/ (no {', '.join(DATA_SUFFIXES)} data file)"]
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (snapshot / name).is_file()]
    if not any((snapshot / name).is_file() for name in TOKENIZER_DATA):
        missing.append(TOKENIZER_DATA[0])
    index = snapshot / SAFETENSORS_INDEX
    if index.is_file():
        from deepscaler.store import read_json

        try:
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        except Exception:  # a torn index: fetch it again
            shards = [SAFETENSORS_INDEX]
        missing += [s for s in shards if not (snapshot / s).is_file()]
    elif not (snapshot / "model.safetensors").is_file():
        missing.append("model.safetensors")
    return [str(snapshot / m) for m in missing]


@dataclass(frozen=True)
class CacheState:
    repo: HubRepo
    commit: str | None
    snapshot: Path | None
    missing: list[str]  # empty: complete

    @property
    def complete(self) -> bool:
        return self.commit is not None and not self.missing


def cache_state(cache: Path, repo: HubRepo) -> CacheState:
    """Where ``repo`` stands in the cache; cheap and local (no network, no hashing)."""
    commit = resolve_commit(cache, repo)
    if commit is None:
        what = f"refs/{repo.ref}" if not (repo.revision and _COMMIT_RE.match(repo.revision)) else f"snapshots/{repo.revision}"
        return CacheState(repo, None, None, [str(cache / repo.folder_name / what)])
    snapshot = cache / repo.folder_name / "snapshots" / commit
    return CacheState(repo, commit, snapshot, missing_files(snapshot, repo))


def prefetch_command(cfg: Config) -> str:
    """The command that fills the cache for ``cfg``: the stage file plus every value that
    decides what is fetched and where, so it is exact whatever presets produced ``cfg``."""
    args = ["python", "-m", "deepscaler.prefetch", "--stage", str(cfg.run.stage)]
    try:
        base: Config | None = stage_config(cfg.run.stage)
    except ConfigError:
        base = None
    if base is None or cfg.run.output_dir != base.run.output_dir:
        args += ["--output-dir", cfg.run.output_dir]
    keys = ["run.name", "model.name", "model.revision", "data.train", "data.cache_dir"]
    if cfg.model.name == "tiny":  # what the tiny model's folder name hashes (tiny_model_dir)
        keys += ["run.seed"] + [f"model.tiny.{f}" for f in vars(cfg.model.tiny)]
    for key in keys:
        value = _value(cfg, key)
        if base is None or value != _value(base, key):
            args.append(f"{key}={'null' if value is None else value}")
    return shlex.join(args)


def _value(cfg: Config, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def cache_error(cfg: Config, state: CacheState) -> CacheError:
    if state.commit is None:
        what = f"the Hub cache has no {state.repo.describe()} (no {state.missing[0]})"
    else:
        more = f" (and {len(state.missing) - 1} more)" if len(state.missing) > 1 else ""
        what = f"the Hub cache lacks {state.missing[0]}{more} of {state.repo.describe()} (commit {state.commit})"
    return CacheError(f"{what}; fetch it on the login node with: {prefetch_command(cfg)}")


def require_cache(cfg: Config, data: bool = True) -> dict[str, CacheState]:
    """Check that the cache holds every Hub model (and dataset, with ``data``) that ``cfg``
    uses, when ``run.hub_offline``; raises CacheError naming the first missing file. Cheap and
    local: submit calls it before sbatch, the job again when it starts."""
    if not cfg.run.hub_offline:
        return {}
    cache = cache_dir(cfg)
    states = {}
    for repo in hub_repos(cfg) if data else [r for r in [hub_model(cfg)] if r]:
        state = cache_state(cache, repo)
        if not state.complete:
            raise cache_error(cfg, state)
        states[repo.repo_type] = state
    return states


def model_snapshot(cfg: Config, repo: HubRepo) -> Path:
    """The local folder of a Hub model, in ``data.cache_dir``: offline the prefetched snapshot
    (CacheError when incomplete), online downloaded into the cache first."""
    cache = cache_dir(cfg)
    if cfg.run.hub_offline:
        state = cache_state(cache, repo)
        if not state.complete:
            raise cache_error(cfg, state)
        return state.snapshot
    return download(cache, repo)


# --------------------------------------------------------------------------- the tiny model


def prepare_model(cfg: Config, echo=print) -> Path | None:
    """Build the tiny preset's model into the cache, once (warm-started when the preset says so):
    the explicit step before any process loads it. Concurrent callers are safe (built aside,
    renamed). None for any other model: a Hub model is fetched by :func:`prefetch`."""
    if cfg.model.name != "tiny":
        return None
    from deepscaler.tiny import ensure_tiny_model

    return ensure_tiny_model(cache_dir(cfg), cfg.model.tiny, seed=cfg.run.seed, log=echo)


def tiny_model(cfg: Config) -> Path:
    """The tiny preset's model folder as :func:`prepare_model` built it; a one-line CacheError
    naming the command that builds it when it is not there."""
    from deepscaler.tiny import is_built, tiny_model_dir

    folder = tiny_model_dir(cache_dir(cfg), cfg.model.tiny, cfg.run.seed)
    if not is_built(folder):
        raise CacheError(f"the tiny model is not built ({folder}); build it with: {prefetch_command(cfg)}")
    return folder


# --------------------------------------------------------------------------- downloading


def download(cache: Path, repo: HubRepo) -> Path:
    """``huggingface_hub.snapshot_download`` into the cache (the one call that needs the network)."""
    import huggingface_hub

    from deepscaler.data import DATA_SUFFIXES

    patterns = MODEL_PATTERNS if repo.repo_type == "model" else [f"*{s}" for s in DATA_SUFFIXES]
    try:
        folder = huggingface_hub.snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                                   cache_dir=str(cache), allow_patterns=patterns)
    except Exception as e:  # HTTP, auth, offline and not-found errors; their text carries no token
        first = (str(e).splitlines() or [""])[0]
        raise CacheError(f"cannot download {repo.describe()} into {cache}: {type(e).__name__}: {first}") from None
    return Path(folder)


def _files(snapshot: Path) -> dict[str, int]:
    out = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            out[path.relative_to(snapshot).as_posix()] = path.stat().st_size
    return out


def prefetch(cfg: Config, refresh: bool = False, echo=print) -> Path:
    """Fetch what ``cfg`` needs into the cache, then write ``<run>/stage<K>/prefetch.json``."""
    import huggingface_hub

    from deepscaler.store import RunStore, atomic_write_json, atomic_write_text

    cache = cache_dir(cfg)
    record: dict = {"cache_dir": str(cache.resolve()), "created_unix": time.time(),
                    "huggingface_hub": huggingface_hub.__version__, "model": None, "data": None}
    repos = hub_repos(cfg)
    tiny = prepare_model(cfg, echo)
    if tiny is not None:
        echo(f"tiny model: ready in {tiny}")
    if not repos:
        echo(f"nothing to fetch: model.name={cfg.model.name} and data.train={cfg.data.train} need no Hub")
    for repo in repos:
        state = cache_state(cache, repo)
        downloaded = refresh or not state.complete
        if downloaded:
            echo(f"{repo.describe()}: downloading into {cache} ...")
            folder = download(cache, repo)
            state = cache_state(cache, HubRepo(repo.repo_id, repo.repo_type, folder.name))
            if state.missing:  # e.g. a model with only pickled *.bin weights
                raise CacheError(f"{repo.describe()} was downloaded but lacks {state.missing[0]}")
            if not repo.revision or not _COMMIT_RE.match(repo.revision):
                ref = cache / repo.folder_name / "refs" / repo.ref
                if resolve_commit(cache, repo) != folder.name:  # snapshot_download writes it; make sure
                    atomic_write_text(ref, folder.name)
        else:
            echo(f"{repo.describe()}: already complete (commit {state.commit})")
        files = _files(state.snapshot)
        record["model" if repo.repo_type == "model" else "data"] = {
            "repo_id": repo.repo_id, "revision": repo.ref, "commit": state.commit,
            "snapshot": str(state.snapshot.resolve()), "downloaded": downloaded,
            "files": len(files), "bytes": sum(files.values())}
        echo(f"{repo.describe()}: commit {state.commit}, {len(files)} files, {sum(files.values()) / 1e9:.2f} GB "
             f"in {state.snapshot}")
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    path = atomic_write_json(store.root / PREFETCH_FILE, record)
    echo(f"recorded in {path}")
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepscaler.prefetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, default=1, help="the stage whose model and data to fetch (default 1)")
    p.add_argument("--preset", action="append", metavar="NAME|FILE",
                   help="a preset applied on top of the stage file; several stack in order (as submit's)")
    p.add_argument("--output-dir", help="where runs are written (run.output_dir); the cache defaults to <it>/cache")
    p.add_argument("--refresh", action="store_true", help="download even when the cache is complete (re-resolve main)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for deepscaler.submit")
    args = parse_command_line(p, argv)
    try:
        overrides = refuse_repeated_keys(args.overrides)
        overrides += [f"run.output_dir={args.output_dir}"] if args.output_dir is not None else []
        cfg = stage_config(args.stage, args.preset, overrides)
        apply_process_settings(cfg, job=False)
        prefetch(cfg, args.refresh, echo=lambda line: print(line, flush=True))
        require_cache(cfg)
    except (ConfigError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if cfg.run.hub_offline:
        print("jobs of this config read this cache with HF_HUB_OFFLINE=1", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
