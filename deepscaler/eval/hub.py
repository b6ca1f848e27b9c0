"""A weights step as a Hugging Face model repository (``python -m deepscaler.eval upload``).

    python -m deepscaler.eval upload --output-dir DIR --run NAME --stage K --step N --repo-id ORG/NAME \\
        [--public] [--dry-run]

Uploads the step's Hugging Face folder (config, safetensors, tokenizer, generation config:
exactly the files its STABLE manifest lists, less the project's own probe.json; never a symlink)
to a private repository unless ``--public`` is given, plus a model card (README.md) holding
the eval table of that step beside the base model (``deepscaler/eval/report.py``) and the
training recipe from ``run.yaml``. ``--dry-run`` lists the files and prints the card
(:func:`upload_plan`); nothing is sent.

One commit (``create_repo`` then ``create_commit`` with every file and the card), so a
repository never shows weights without their card. The token comes from ``HF_TOKEN`` or the
Hub's own login (``hf auth login``) and is never printed.

"Upload", not "publish": in this project publishing is only making ``weights/step_N`` available
to the inference servers (``deepscaler/trainer/publisher.py``; the format: ``deepscaler/weights_format.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepscaler.config import Config, load_config
from deepscaler.data import PROMPT_SUFFIX, looks_like_repo_id
from deepscaler.eval.report import raw_lines, summaries, table
from deepscaler.store import BASE_EVAL, LEASE_PREFIX, STABLE, RunStore

PROJECT_FILES = {STABLE, "probe.json"}  # the filesystem contract's, not the model's


class UploadError(RuntimeError):
    """An upload that cannot go ahead (a bad repo id, no token, the Hub refused). One line."""


def check_repo_id(repo_id: str) -> None:
    if not looks_like_repo_id(repo_id):
        raise UploadError(f"--repo-id '{repo_id}': expected owner/name, e.g. my-org/DeepScaleR-1.5B-repro")


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise UploadError(f"{path} is a symlink (to {os.readlink(path)}): an upload sends only the step's own files; "
                          "refusing")


def model_files(store: RunStore, step: int) -> list[tuple[str, Path]]:
    """(path in the repository, local file) of a stable weights step, sorted: the files its
    STABLE manifest lists, which the trainer wrote, less the project's own. A file added to the
    folder later is not sent, and a symlink (the step folder, or a listed file or folder on the
    way to it) is refused, so an upload never carries a file from elsewhere (docs/security.md)."""
    folder = store.step_dir("weights", step)
    _refuse_symlink(folder)
    files = []
    for rel in sorted(store.read_manifest("weights", step).get("files", {})):
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise UploadError(f"{folder / STABLE} lists {rel!r}, which is outside the step; refusing")
        if rel in PROJECT_FILES or parts[-1].startswith((LEASE_PREFIX, ".")):
            continue
        for i in range(1, len(parts) + 1):
            _refuse_symlink(folder.joinpath(*parts[:i]))
        if not (folder / rel).is_file():
            raise UploadError(f"{folder / rel} is listed in {STABLE} but missing: the step is incomplete")
        files.append((rel, folder / rel))
    return files


def _recipe(cfg: Config, step: int) -> list[str]:
    """The training recipe as a two-column table (what the card reader needs to reproduce it)."""
    o, t, s, loss = cfg.orchestrator, cfg.trainer, cfg.sampling, cfg.trainer.loss
    opt = t.optimizer
    rows = [
        ("base model", f"`{cfg.model.name}`"),
        ("training data", f"`{cfg.data.train}`"),
        ("stage, step", f"stage {cfg.run.stage}, weights step {step}"),
        ("algorithm", f"GRPO, {o.prompts_per_step} prompts x {s.samples_per_prompt} samples per step, "
                      f"{t.mini_batches_per_step} optimizer update(s) per step, {t.ppo_epochs} PPO epoch(s)"),
        ("advantage", "(reward - group mean) / (group std + 1e-6), token-mean loss"),
        ("reward", "1 if the last `\\boxed{}` after `</think>` matches the answer, else 0"),
        ("context", f"prompt up to {cfg.data.max_prompt_tokens} tokens, response up to {s.max_response_tokens}"),
        ("sampling", f"temperature {s.temperature:g}, top_p {s.top_p:g}"),
        ("optimizer", f"AdamW, lr {opt.lr:g} ({opt.scheduler}), weight decay {opt.weight_decay:g}, "
                      f"grad clip {opt.grad_clip:g}"),
        ("clip ratio", f"{loss.clip_ratio_low:g} / {loss.clip_ratio_high:g}"),
        ("KL", f"{loss.kl_type}, coefficient {loss.kl_coef:g}"),
        ("entropy bonus", f"{loss.entropy_coef:g}"),
        ("async level", f"{o.async_level} (0: on-policy)"),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def model_card(store: RunStore, step: int, repo_id: str) -> str:
    """README.md of the repository: metadata, the eval table of this step and the base, the recipe."""
    cfg = load_config(store.run_yaml)
    results = summaries(store)
    shown = {w: results[w] for w in (BASE_EVAL, step) if w in results}
    meta = ["---", "license: mit", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", "- deepscaler", "- grpo", "- math", "- reasoning"]
    if looks_like_repo_id(cfg.model.name):  # a Hub id, not "tiny" or a local folder
        meta.append(f"base_model: {cfg.model.name}")
    meta.append("---")
    title = repo_id.split("/")[-1]
    lines = [*meta, "", f"# {title}", "",
             f"`{cfg.model.name}` trained with GRPO on the [DeepScaleR](https://github.com/agentica-project/rllm) "
             f"recipe by the `deepscaler` project: run `{store.run}`, stage {store.stage}, weights step {step}.",
             "", "## Evaluation", ""]
    if step in shown:
        first = next(iter(shown[step].values()))
        lines += table(shown)
        lines += ["", f"Sampling: temperature {first['temperature']:g}, top_p {first['top_p']:g}, up to "
                      f"{first['max_response_tokens']} tokens, seed {first['seed']} ({first['backend']} backend).",
                  "", "```", *raw_lines(shown), "```"]
    else:
        lines += [f"Not evaluated yet (`python -m deepscaler.eval run --model {step} --run {store.run} "
                  f"--stage {store.stage}`)."]
    lines += ["", "## Training recipe", "", *_recipe(cfg, step), "", "## Usage", "",
              "Prompt: the problem followed by"
              f" `{PROMPT_SUFFIX.strip()}`, in the chat template, no system prompt.", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    return "\n".join(lines)


def hub_token() -> str | None:
    """HF_TOKEN, else the token of the Hub's own login; None when there is neither."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def upload_plan(store: RunStore, step: int, repo_id: str, private: bool = True) -> str:
    """What ``--dry-run`` prints: the files with their sizes, then the card."""
    files = model_files(store, step)
    lines = [f"# would upload {len(files) + 1} files to https://huggingface.co/{repo_id}"
             f" ({'private' if private else 'public'}):"]
    lines += [f"{path.stat().st_size:>14,d}  {rel}" for rel, path in files]
    lines += [f"{'(card)':>14}  README.md", "# README.md:"]
    return "\n".join(lines) + "\n" + model_card(store, step, repo_id)


def upload_step(store: RunStore, step: int, repo_id: str, private: bool = True, api: Any = None) -> str:
    """Create the repository (if needed; private unless ``private`` is False) and commit the
    step's files and the card in one commit. A repository that exists keeps its visibility.

    ``api``: a ``huggingface_hub.HfApi`` (the default, with the token of :func:`hub_token`);
    tests pass a fake with the same two methods. Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd

    files = model_files(store, step)  # a step that is not stable fails before the token is looked for
    if api is None:
        token = hub_token()
        if not token:
            raise UploadError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    card = model_card(store, step, repo_id)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
                  for rel, path in files if rel != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=f"deepscaler run {store.run} stage {store.stage} step {step}")
    except Exception as e:  # HfHubHTTPError and friends: their text has the URL, never the token
        raise UploadError(f"the Hub refused {repo_id}: {type(e).__name__}: {' '.join(str(e).split())[:400]}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
