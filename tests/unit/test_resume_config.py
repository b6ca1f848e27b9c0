"""The resume rule (deepscaler/resume_config.py) on real run.yaml files, and run.yaml's history
(deepscaler.launch.write_run_yaml). The real resumes are in tests/integration/test_resume_config.py."""

from __future__ import annotations

import os

import pytest
import yaml

from deepscaler.config import ConfigError, load_config, stage_config, to_dict
from deepscaler.launch import write_run_yaml
from deepscaler.resume_config import MAY_CHANGE, NEVER_CHANGE, check_resume, flatten
from deepscaler.store import RunStore


def tiny(tmp_path, *overrides: str):
    return stage_config(1, "tiny-random", [f"run.output_dir={tmp_path}", *overrides])


@pytest.fixture
def store(tmp_path) -> RunStore:
    """A stage whose run.yaml says what the tiny-random preset ran."""
    s = RunStore(tmp_path, "tiny", 1)
    write_run_yaml(tiny(tmp_path), s)
    return s


def refusal(store, cfg, allow: bool = False) -> str:
    with pytest.raises(ConfigError) as err:
        check_resume(store, cfg, "latest", allow)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_changed_recipe_key_is_refused_naming_each_key_old_and_new(store, tmp_path):
    text = refusal(store, tiny(tmp_path, "sampling.samples_per_prompt=8", "trainer.optimizer.lr=5e-4",
                               "log.level=debug"))
    assert text == ("--resume-step latest would change the recipe of run 'tiny' stage 1: "
                    "sampling.samples_per_prompt 4 -> 8, trainer.optimizer.lr 0.0001 -> 0.0005; "
                    "pass --allow-config-change to resume with them anyway")


@pytest.mark.parametrize("override", [
    "sampling.top_p=0.9", "trainer.loss.kl_coef=0.01", "trainer.optimizer.betas=[0.9,0.99]", "data.max_problems=10",
    "orchestrator.prompts_per_step=4", "trainer.precision=bf16", "wandb.project=other", "run.deterministic=true",
])
def test_every_key_not_listed_is_part_of_the_recipe(store, tmp_path, override):
    assert override.split("=")[0] in refusal(store, tiny(tmp_path, override))


def test_keys_that_may_change_are_accepted_and_reported(store, tmp_path):
    cfg = tiny(tmp_path, "run.max_steps=10", "log.level=debug", "slurm.partition=gpu", "checkpoint.keep_last=5",
               "trainer.micro_batch_tokens=512", "orchestrator.request_timeout_s=60", "eval.temperature=0.3",
               "wandb.mode=offline")
    keys = [k for k, _, _ in check_resume(store, cfg, "latest", allow=False)]
    assert keys == ["run.max_steps", "orchestrator.request_timeout_s", "trainer.micro_batch_tokens", "slurm.partition",
                    "checkpoint.keep_last", "eval.temperature", "log.level", "wandb.mode"]
    assert check_resume(store, tiny(tmp_path), "latest", allow=False) == []  # the same config: no change


def test_max_steps_sets_a_cosine_schedule_so_it_is_recipe_there(tmp_path):
    s = RunStore(tmp_path, "tiny", 1)
    write_run_yaml(tiny(tmp_path, "trainer.optimizer.scheduler=cosine"), s)
    assert "run.max_steps 4 -> 10" in refusal(s, tiny(tmp_path, "trainer.optimizer.scheduler=cosine",
                                                         "run.max_steps=10"))


def test_allow_config_change_accepts_recipe_keys_but_not_what_a_resume_cannot_apply(store, tmp_path):
    diffs = check_resume(store, tiny(tmp_path, "trainer.optimizer.lr=5e-4"), "latest", allow=True)
    assert diffs == [("trainer.optimizer.lr", 1e-4, 5e-4)]
    text = refusal(store, tiny(tmp_path, "run.seed=1", "model.tiny.hidden_size=64"), allow=True)
    assert text.startswith("--resume-step latest would change run.seed 0 -> 1, model.tiny.hidden_size 128 -> 64 "
                           "of run 'tiny' stage 1, which a resume cannot apply")
    assert "start a new run.name" in text
    text = refusal(store, tiny(tmp_path, "slurm.trainer.gpus_per_node=2"), allow=True)
    assert "slurm.trainer.gpus_per_node 0 -> 2" in text and "partitioned for 1 trainer rank(s)" in text
    assert "trainer.deepspeed.zero_stage 1 -> 2" in refusal(store, tiny(tmp_path, "trainer.deepspeed.zero_stage=2"),
                                                            allow=True)


def test_the_trainer_may_move_to_other_nodes_with_the_same_number_of_ranks(tmp_path):
    s = RunStore(tmp_path, "tiny", 1)
    write_run_yaml(tiny(tmp_path, "slurm.trainer.nodes=2", "slurm.trainer.gpus_per_node=2"), s)
    cfg = tiny(tmp_path, "slurm.trainer.nodes=1", "slurm.trainer.gpus_per_node=4", "slurm.partition=big")
    assert [k for k, _, _ in check_resume(s, cfg, "latest", allow=False)] == [
        "slurm.partition", "slurm.trainer.nodes", "slurm.trainer.gpus_per_node"]


def test_every_listed_key_is_a_key_of_the_config():
    """A renamed key must not leave a stale entry behind (it would silently stop matching)."""
    keys = flatten(to_dict(tiny("/x")))
    for prefix in [*MAY_CHANGE, *NEVER_CHANGE]:
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix


def test_an_unreadable_run_yaml_is_refused_unless_allowed(store, tmp_path):
    store.run_yaml.write_text("run: [\n")
    assert str(store.run_yaml) in refusal(store, tiny(tmp_path))
    assert check_resume(store, tiny(tmp_path), "latest", allow=True) == []


def test_run_yaml_keeps_every_replaced_version_in_its_history(store, tmp_path):
    first = store.run_yaml.read_text()
    os.utime(store.run_yaml, (1_700_000_000, 1_700_000_000))
    write_run_yaml(load_config(store.run_yaml), store)  # a requeued attempt re-reads run.yaml: nothing changes
    assert not store.run_history_dir.exists()
    assert store.run_yaml.stat().st_mtime == 1_700_000_000
    write_run_yaml(tiny(tmp_path, "run.max_steps=10"), store)
    assert yaml.safe_load(store.run_yaml.read_text())["run"]["max_steps"] == 10
    kept = sorted(store.run_history_dir.iterdir())
    assert [p.name for p in kept] == ["20231114T221320Z.yaml"] and kept[0].read_text() == first
    os.utime(store.run_yaml, (1_700_000_000, 1_700_000_000))
    write_run_yaml(tiny(tmp_path, "run.max_steps=12"), store)  # written in the same second: a second name
    assert [p.name for p in sorted(store.run_history_dir.iterdir())] == ["20231114T221320Z-1.yaml",
                                                                         "20231114T221320Z.yaml"]
