"""Which config keys a resume may change: the one rule, checked at submit.

Why: a resume continues a run, so its recipe (sampling, optimizer, loss, data, model, seeds)
must stay what the checkpoint was trained with. A changed recipe key would otherwise be half
applied (the optimizer state loaded from the checkpoint carries the old lr) while ``run.yaml``
claimed the new value. The rule is a list of the keys that MAY change; any other key,
including one added later, is refused unless ``--allow-config-change`` is passed, and a few
keys cannot take effect on a resume at all and are refused even then.
"""

from __future__ import annotations

import json
from typing import Any

from deepscaler.config import Config, ConfigError, load_config, to_dict
from deepscaler.store import RunStore

# Keys (or whole sections, by prefix) a resume may change freely: where and how long the stage
# runs, its resources, timeouts, memory knobs that leave the result as it is, logging, eval
# and retention. Anything else is part of the recipe.
MAY_CHANGE = (
    "run.output_dir",  # the run was moved or is reached by another path: the store was found there
    "run.max_steps",  # how far the stage goes (not under a cosine schedule: see may_change)
    "run.umask",
    "run.hub_offline",
    "run.lock_heartbeat_s",
    "run.lock_stale_s",
    "data.cache_dir",
    "orchestrator.request_timeout_s",
    "orchestrator.weights_timeout_s",
    "orchestrator.reward.workers",
    "trainer.micro_batch_tokens",  # packing only: the gradient is the token-mean of the mini-batch
    "trainer.logits_chunk_tokens",
    "trainer.attn_implementation",
    "trainer.rollout_timeout_s",
    "trainer.deepspeed.activation_checkpointing",
    "inference.tensor_parallel",
    "inference.gpu_memory_utilization",
    "inference.enable_prefix_caching",
    "inference.startup_timeout_s",
    "inference.weight_update",
    "inference.liveness_timeout_s",
    "inference.socket_timeout_s",
    "inference.max_connections",
    "slurm",  # resources, partition, time; not the trainer's world size (see never_change)
    "checkpoint.interval",
    "checkpoint.keep_last",
    "checkpoint.keep_every",
    "eval",
    "log",
    "wandb.mode",
    "wandb.tags",
)

# Keys a resume cannot apply, so they are refused even with --allow-config-change: the
# checkpoint holds this model's weights and the trainer's RNG and data order, and the keys
# that say how a stage starts are not read again when it resumes.
NEVER_CHANGE = {
    "model": "the checkpoint holds the weights of the old model",
    "run.seed": "the trainer's RNG and the data order come from the checkpoint",
    "checkpoint.init_from_stage": "it decides how a stage starts, and a resume does not start it again",
    "checkpoint.load_optimizer": "it decides how a stage starts, and a resume does not start it again",
    "checkpoint.reset_step": "it decides how a stage starts, and a resume does not start it again",
    "checkpoint.reset_data_order": "it decides how a stage starts, and a resume does not start it again",
    "trainer.deepspeed.zero_stage": "the optimizer state in the checkpoint is partitioned for its ZeRO stage",
}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def may_change(key: str, new: Config) -> bool:
    """True when a resume may change ``key`` without --allow-config-change."""
    if key == "run.max_steps" and new.trainer.optimizer.scheduler == "cosine":
        return False  # the cosine schedule's length: a new max_steps changes every later lr
    return any(_under(key, p) for p in MAY_CHANGE)


def never_change(key: str, old: Config, new: Config) -> str | None:
    """Why a resume cannot apply ``key`` at all, or None."""
    from deepscaler.launch import trainer_ranks

    if key in ("slurm.trainer.nodes", "slurm.trainer.gpus_per_node") and trainer_ranks(old) != trainer_ranks(new):
        return f"the optimizer state in the checkpoint is partitioned for {trainer_ranks(old)} trainer rank(s)"
    return next((why for p, why in NEVER_CHANGE.items() if _under(key, p)), None)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a config tree (``to_dict``); lists are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_ABSENT = object()


def changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every leaf that differs, in config order."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def listing(diffs: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, a, b in diffs)


def check_resume(store: RunStore, new: Config, resume: str, allow: bool) -> list[tuple[str, Any, Any]]:
    """Compare a resume's resolved config with the stage's ``run.yaml``; returns the changes it
    makes (all allowed), or raises ConfigError in one line naming the refused keys."""
    where = f"--resume-step {resume} would change"
    run = f"of run '{new.run.name}' stage {new.run.stage}"
    if not store.run_yaml.is_file():
        return []  # nothing recorded to compare with (a stage written before run.yaml existed)
    try:
        old = load_config(store.run_yaml)
    except (ConfigError, OSError) as e:
        if allow:
            return []
        raise ConfigError(f"{store.run_yaml} cannot be read to compare the resume with ({e}); "
                          "pass --allow-config-change to resume with the new config anyway") from None
    diffs = changes(old, new)
    never = [d for d in diffs if never_change(d[0], old, new)]
    if never:
        reasons = "; ".join(dict.fromkeys(never_change(k, old, new) for k, _, _ in never))
        raise ConfigError(f"{where} {listing(never)} {run}, which a resume cannot apply ({reasons}); "
                          "start a new run.name for them")
    refused = [d for d in diffs if not may_change(d[0], new)]
    if refused and not allow:
        raise ConfigError(f"{where} the recipe {run}: {listing(refused)}; "
                          "pass --allow-config-change to resume with them anyway")
    return diffs
