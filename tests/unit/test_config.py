"""The typed config: every shipped file, the recipe values, composition, overrides and errors."""

import subprocess
import sys
from pathlib import Path

import pytest

import yaml

from deepscaler.config import Config, ConfigError, find_config, load_config, stage_config, to_yaml, yaml_dir
from deepscaler.slurm.options import time_minutes

REPO = Path(__file__).resolve().parents[2]

YAML_DIR = Path(__file__).resolve().parents[2] / "yaml"
SHIPPED = sorted(YAML_DIR.glob("*.yaml"))


def test_yaml_dir_is_the_checkout():
    assert yaml_dir() == YAML_DIR


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_file_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The printed YAML is itself a valid config that gives back the same tree (run.yaml relies on it).
    assert load_config(_write(tmp_path / "resolved.yaml", to_yaml(cfg))) == cfg


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "stage, response, samples, steps, nodes, gpus",
    [(1, 8192, 8, 1040, 1, 4), (2, 16384, 16, 480, 2, 8), (3, 24576, 16, 230, 2, 8)],
)
def test_stage_files_reproduce_the_recipe(stage, response, samples, steps, nodes, gpus):
    cfg = load_config(YAML_DIR / f"stage{stage}.yaml")
    assert cfg.run.stage == stage
    assert cfg.run.max_steps == steps
    assert cfg.sampling.max_response_tokens == response
    assert cfg.sampling.samples_per_prompt == samples
    assert cfg.sampling.temperature == 0.6 and cfg.sampling.top_p == 1.0
    assert cfg.orchestrator.prompts_per_step == 128
    assert cfg.trainer.mini_batches_per_step == 2 and cfg.trainer.ppo_epochs == 1
    opt, loss = cfg.trainer.optimizer, cfg.trainer.loss
    assert (opt.name, opt.lr, opt.scheduler, opt.grad_clip) == ("adamw", 1e-6, "constant", 1.0)
    assert (loss.clip_ratio_low, loss.clip_ratio_high) == (0.2, 0.2)
    assert (loss.kl_coef, loss.kl_type, loss.entropy_coef) == (0.001, "low_var_kl", 0.001)
    assert loss.aggregation == "token_mean"
    assert cfg.data.max_prompt_tokens == 1024
    assert cfg.model.name == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cfg.data.train == "agentica-org/DeepScaleR-Preview-Dataset"
    assert (cfg.slurm.inference.nodes, cfg.slurm.inference.gpus_per_node) == (nodes, gpus)
    assert (cfg.slurm.trainer.nodes, cfg.slurm.trainer.gpus_per_node) == (nodes, gpus)
    assert cfg.checkpoint.init_from_stage == (None if stage == 1 else stage - 1)


def test_eval_file_has_the_protocol():
    ev = load_config(YAML_DIR / "eval.yaml").eval
    assert ev.benchmarks["math500"].samples == 1
    assert ev.benchmarks["aime2024"].samples == 16
    assert (ev.temperature, ev.top_p, ev.max_response_tokens) == (0.6, 0.95, 32768)


def test_tiny_preset_overlays_any_stage():
    for stage in (1, 2, 3):
        cfg = stage_config(stage, "tiny-random")
        assert cfg.run.stage == stage
        assert cfg.model.name == "tiny" and cfg.inference.backend == "hf"
        assert cfg.sampling.max_response_tokens == 64
        assert cfg.slurm.trainer.gpus_per_node == 0
        # Recipe values the preset does not touch survive.
        assert cfg.trainer.loss.kl_coef == 0.001


PAPER_KEYS = {
    "base.yaml": ["name: deepseek-ai", "train: agentica-org", "max_prompt_tokens: 1024", "temperature: 0.6",
                  "top_p: 1.0", "prompts_per_step: 128", "mini_batches_per_step: 2", "lr: 1.0e-6",
                  "clip_ratio_low: 0.2", "clip_ratio_high: 0.2", "kl_coef: 0.001", "kl_type: low_var_kl",
                  "entropy_coef: 0.001", "grad_clip: 1.0", "top_p: 0.95", "max_response_tokens: 32768"],
    "stage1.yaml": ["samples_per_prompt: 8", "max_response_tokens: 8192", "max_steps: 1040"],
    "stage2.yaml": ["samples_per_prompt: 16", "max_response_tokens: 16384", "max_steps: 480"],
    "stage3.yaml": ["samples_per_prompt: 16", "max_response_tokens: 24576", "max_steps: 230"],
}


@pytest.mark.parametrize("name", sorted(PAPER_KEYS))
def test_paper_values_carry_a_comment(name):
    lines = (YAML_DIR / name).read_text().splitlines()
    for key in PAPER_KEYS[name]:
        matching = [ln for ln in lines if ln.strip().startswith(key)]
        assert matching, f"{name}: no line starts with {key!r}"
        assert all("# paper:" in ln for ln in matching), f"{name}: {key!r} has no '# paper:' comment"


# --------------------------------------------------------------------------- composition and overrides


def test_extends_and_later_files_win(tmp_path):
    _write(tmp_path / "a.yaml", "run: {name: a, seed: 1}\nsampling: {top_p: 0.5}\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\nrun: {name: b}\n")
    _write(tmp_path / "c.yaml", "sampling: {top_p: 0.7}\n")
    cfg = load_config([tmp_path / "b.yaml", tmp_path / "c.yaml"])
    assert (cfg.run.name, cfg.run.seed, cfg.sampling.top_p) == ("b", 1, 0.7)


def test_overrides_are_typed():
    cfg = load_config(
        YAML_DIR / "stage1.yaml",
        [
            "trainer.optimizer.lr=2e-6",  # YAML 1.1 reads this as a string; the float field converts it
            "run.name=007",  # a string field keeps the text as typed
            "slurm.extra_sbatch=[--exclusive, --mail-type=END]",
            "slurm.partition=null",
            "run.max_steps=5",
            "eval.benchmarks.amc.samples=4",
        ],
    )
    assert cfg.trainer.optimizer.lr == 2e-6
    assert cfg.run.name == "007"
    assert cfg.slurm.extra_sbatch == ["--exclusive", "--mail-type=END"]
    assert cfg.slurm.partition is None
    assert cfg.run.max_steps == 5
    assert cfg.eval.benchmarks["amc"].samples == 4 and cfg.eval.benchmarks["amc"].pass_k is None
    assert cfg.eval.benchmarks["aime2024"].samples == 16


def test_find_config_by_name():
    assert find_config("stage2") == YAML_DIR / "stage2.yaml"
    assert find_config("tiny-random.yaml") == YAML_DIR / "tiny-random.yaml"


def test_time_minutes():
    assert time_minutes("90") == 90
    assert time_minutes("01:30") == 2  # M:S rounds up
    assert time_minutes("04:00:00") == 240
    assert time_minutes("2-00:00:00") == 2880
    assert time_minutes("1-12") == 2160


# --------------------------------------------------------------------------- errors: one line, naming file, key, hint


def _error(tmp_path, text=None, overrides=(), files=None):
    if files is None:
        files = [_write(tmp_path / "bad.yaml", text)]
    with pytest.raises(ConfigError) as e:
        load_config(files, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_file_key_and_closest(tmp_path):
    msg = _error(tmp_path, "trainer:\n  optimiser:\n    lr: 1.0e-6\n")
    assert str(tmp_path / "bad.yaml") in msg
    assert "unknown key 'trainer.optimiser'" in msg
    assert "did you mean 'trainer.optimizer'" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, "sampler: {top_p: 1}\n")
    assert "unknown key 'sampler'" in msg and "did you mean 'sampling'" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = _error(tmp_path, "sampling: {zzzz: 1}\n")
    assert "valid: sampling.samples_per_prompt" in msg


def test_wrong_types(tmp_path):
    assert "key 'trainer.optimizer.lr' must be a number, got 'abc'" in _error(tmp_path, "trainer: {optimizer: {lr: abc}}")
    assert "key 'run.seed' must be an integer, got 1.5" in _error(tmp_path, "run: {seed: 1.5}")
    assert "key 'run.deterministic' must be true or false, got 'yes please'" in _error(
        tmp_path, "run: {deterministic: yes please}"
    )
    assert "key 'slurm.setup' must be a list of a string" in _error(tmp_path, "slurm: {setup: module load x}")
    assert "key 'sampling' must be a mapping" in _error(tmp_path, "sampling: 3")


def test_literal_suggests_closest_choice(tmp_path):
    msg = _error(tmp_path, "inference: {backend: vlm}")
    assert "must be one of 'vllm', 'hf'" in msg and "did you mean 'vllm'" in msg


def test_override_errors_name_the_override(tmp_path):
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=["trainer.optimiser.lr=1"])
    assert msg.startswith("override 'trainer.optimiser.lr=1': unknown key 'trainer.optimiser'")
    assert "did you mean 'trainer.optimizer'" in msg
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=["run.seed=many"])
    assert "override 'run.seed=many': key 'run.seed' must be an integer" in msg
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=["run.seed"])
    assert "expected key.path=value" in msg
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=["run.seed.x=1"])
    assert "key 'run.seed' has no sub-keys" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    msg = _error(tmp_path, "run:\n  name: [unclosed\n")
    assert f"{tmp_path / 'bad.yaml'}:" in msg and "invalid YAML" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level must be a mapping" in _error(tmp_path, "- a\n- b\n")


def test_extends_errors(tmp_path):
    assert "names a missing file 'nope.yaml'" in _error(tmp_path, "extends: nope.yaml\n")
    _write(tmp_path / "x.yaml", "extends: y.yaml\n")
    _write(tmp_path / "y.yaml", "extends: x.yaml\n")
    assert "forms a cycle" in _error(tmp_path, files=[tmp_path / "x.yaml"])


def test_missing_file_suggests_a_shipped_one(tmp_path):
    assert "stage9: no such config file (did you mean 'stage" in _error(tmp_path, files=["stage9"])


def test_meaning_errors(tmp_path):
    stage1 = YAML_DIR / "stage1.yaml"
    msg = _error(tmp_path, files=[stage1], overrides=["orchestrator.prompts_per_step=127"])
    assert "key 'orchestrator.prompts_per_step' (127) must be divisible by trainer.mini_batches_per_step (2)" in msg
    msg = _error(tmp_path, files=[stage1], overrides=["slurm.trainer.gpus_per_node=16"])
    assert "key 'slurm.trainer.gpus_per_node' (16) is more than a node has" in msg
    msg = _error(tmp_path, files=[stage1], overrides=["slurm.time=2days"])
    assert "key 'slurm.time' '2days' is not a Slurm time" in msg
    msg = _error(tmp_path, files=[stage1], overrides=["slurm.time=1", "slurm.signal_delay_s=30"])
    assert "key 'slurm.signal_delay_s' (30 s) + 30 s must be less than slurm.time (1)" in msg
    load_config([stage1], ["slurm.time=2", "slurm.signal_delay_s=30"])  # 60-90 s per attempt: accepted
    msg = _error(tmp_path, files=[stage1], overrides=["inference.tensor_parallel=3", "slurm.layout=split"])
    assert "must divide slurm.inference.gpus_per_node (4)" in msg
    msg = _error(tmp_path, files=[stage1], overrides=["checkpoint.init_from_stage=1"])
    assert "key 'checkpoint.init_from_stage' must name an earlier stage" in msg
    msg = _error(tmp_path, files=[stage1], overrides=["eval.benchmarks.aime24.samples=4"])
    assert "key 'eval.benchmarks.aime24' is not a known benchmark (did you mean 'aime2024'?)" in msg
    msg = _error(tmp_path, files=[stage1], overrides=["eval.benchmarks.aime2024.pass_k=17"])
    assert "key 'eval.benchmarks.aime2024.pass_k' must be between 1 and samples (16)" in msg


# --------------------------------------------------------------------------- ranges of numeric keys


def _numeric_keys(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Every int/float key of the tree, by walking the dataclass types (a dict's entries as '*')."""
    import dataclasses
    import typing

    keys: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], prefix + f.name
        if typing.get_origin(tp) is dict:
            path, tp = path + ".*", typing.get_args(tp)[1]
        if dataclasses.is_dataclass(tp):
            keys.update(_numeric_keys(tp, path + "."))
            continue
        args = typing.get_args(tp)  # Union members, or a list's item type
        for number in (float, int):
            if tp is number or number in args:
                keys[path] = number
                break
    return keys


def _concrete(key: str) -> str:
    return key.replace("*", "math500")


def test_every_numeric_key_has_a_range():
    """A numeric key without a range lets a value through that the run cannot use (lr=inf,
    ppo_epochs=0): a new key must say its range in config.RANGES."""
    from deepscaler.config import RANGES

    keys = _numeric_keys()
    assert len(keys) >= 60 and "trainer.ppo_epochs" in keys and "trainer.optimizer.betas" in keys
    assert sorted(set(keys) - set(RANGES)) == [], "numeric keys without a range in config.RANGES"
    assert sorted(set(RANGES) - set(keys)) == [], "ranges of keys that do not exist"


@pytest.mark.parametrize("key", sorted(k for k, t in _numeric_keys().items() if t is float))
@pytest.mark.parametrize("value", ["inf", "-.inf", ".nan"])
def test_a_float_key_refuses_a_value_that_is_not_finite(key, value, tmp_path):
    key = _concrete(key)
    override = f"{key}=[0.9, {value}]" if key.endswith("betas") else f"{key}={value}"
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=[override])
    assert f"key '{key}" in msg and "finite" in msg, msg


def _just_outside(bounds) -> list:
    """Values just past each end of a range (a closed int end: one past; an open end: the end)."""
    out = []
    if bounds.low is not None:
        out.append(bounds.low if bounds.low_open else bounds.low - (1 if float(bounds.low).is_integer() else 0.01))
    if bounds.high is not None:
        out.append(bounds.high if bounds.high_open else bounds.high + 1)
    return out


def _range_cases():
    from deepscaler.config import RANGES, Bounds

    for key, number in _numeric_keys().items():  # a key missing from RANGES fails the test above
        for value in _just_outside(RANGES.get(key, Bounds())):
            value = number(value) if number is int or not float(value).is_integer() else float(value)
            yield key, value


@pytest.mark.parametrize("key, value", list(_range_cases()))
def test_a_value_just_outside_a_keys_range_is_refused(key, value, tmp_path):
    key = _concrete(key)
    override = f"{key}=[{value}, 0.999]" if key.endswith("betas") else f"{key}={value}"
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=[override])
    assert msg.startswith(f"{YAML_DIR / 'stage1.yaml'} + {override}: key '{key}") and f"({value})" in msg, msg


@pytest.mark.parametrize("overrides", [
    ["trainer.ppo_epochs=1"], ["trainer.ppo_epochs=4"], ["trainer.optimizer.lr=1e-6"], ["trainer.optimizer.lr=10"],
    ["trainer.optimizer.betas=[0, 0.999]"], ["trainer.optimizer.grad_clip=0"], ["trainer.optimizer.weight_decay=0"],
    ["sampling.top_p=1"], ["sampling.temperature=1e-3"], ["inference.gpu_memory_utilization=1"],
    ["trainer.loss.clip_ratio_low=0"], ["trainer.loss.clip_ratio_low=1"], ["trainer.loss.kl_coef=0"],
    ["trainer.loss.tis_cap=1"], ["trainer.loss.tis_cap=null"], ["trainer.loss.clip_ratio_c=1.5"],
    ["run.seed=0"], ["run.seed=4294967295"], ["eval.seed=4294967295"], ["eval.temperature=0"],
    ["trainer.deepspeed.zero_stage=0"], ["trainer.deepspeed.zero_stage=3"], ["checkpoint.keep_every=0"],
    ["checkpoint.keep_last=1"], ["orchestrator.reward.workers=0"], ["slurm.max_requeues=0"],
    ["slurm.signal_delay_s=0"], ["orchestrator.prompts_per_step=1", "trainer.mini_batches_per_step=1"],
    ["slurm.trainer.gpus_per_node=0"], ["eval.benchmarks.aime2024.pass_k=1"], ["model.tiny.warm_start_updates=0"],
])
def test_values_at_the_edge_of_a_range_are_accepted(overrides):
    cfg = load_config([YAML_DIR / "stage1.yaml"], overrides)
    key, value = overrides[0].split("=")
    got = cfg
    for part in key.split("."):
        got = got[part] if isinstance(got, dict) else getattr(got, part)
    assert got == yaml.safe_load(value) or got == float(value), (key, got)


def test_the_tiny_models_heads_must_divide_its_width(tmp_path):
    stage1 = YAML_DIR / "stage1.yaml"
    msg = _error(tmp_path, files=[stage1], overrides=["model.tiny.num_heads=3"])
    assert msg.endswith("key 'model.tiny.num_heads' (3) must divide model.tiny.hidden_size (128)"), msg
    msg = _error(tmp_path, files=[stage1], overrides=["model.tiny.num_kv_heads=3"])
    assert msg.endswith("key 'model.tiny.num_kv_heads' (3) must divide model.tiny.num_heads (4)"), msg
    cfg = load_config([stage1], ["model.tiny.num_heads=8", "model.tiny.num_kv_heads=8"])
    assert (cfg.model.tiny.num_heads, cfg.model.tiny.num_kv_heads) == (8, 8)


def test_a_range_error_is_one_line_with_the_key_and_value(tmp_path):
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=["trainer.ppo_epochs=0"])
    assert msg.endswith("key 'trainer.ppo_epochs' (0) must be 1 or more"), msg
    msg = _error(tmp_path, files=[YAML_DIR / "stage1.yaml"], overrides=["trainer.optimizer.lr=inf"])
    assert msg.endswith("key 'trainer.optimizer.lr' (inf) must be a finite number"), msg
    msg = _error(tmp_path, "sampling: {top_p: 0}")
    assert msg == f"{tmp_path / 'bad.yaml'}: key 'sampling.top_p' (0.0) must be more than 0 and at most 1", msg


# --------------------------------------------------------------------------- command line


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=YAML_DIR.parent)


def test_cli_prints_only_yaml():
    out = _run("deepscaler.config", "yaml/stage2.yaml")
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(out.stdout)
    assert data["sampling"]["max_response_tokens"] == 16384
    assert data["sampling"]["samples_per_prompt"] == 16
    assert data["orchestrator"]["prompts_per_step"] == 128
    assert data["trainer"]["optimizer"]["lr"] == 1e-6
    assert out.stderr == ""


def test_cli_error_is_one_line_and_exit_2():
    out = _run("deepscaler.config", "yaml/stage1.yaml", "trainer.optimiser.lr=1")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: override")


def test_submit_dry_run_prints_the_resolved_stages():
    out = _run("deepscaler.submit", "--stages", "1,2", "--preset", "tiny-random", "--dry-run", "--max-steps", "3", "--executor", "local")
    assert out.returncode == 0, out.stderr
    docs = [d for d in out.stdout.split("# stage ") if d.strip()]
    assert len(docs) == 2
    assert docs[0].startswith("1 of run 'tiny'") and docs[1].startswith("2 of run 'tiny'")
    second = yaml.safe_load(docs[1].split("\n", 1)[1])
    assert second["run"]["max_steps"] == 3 and second["checkpoint"]["init_from_stage"] == 1


def test_submit_rejects_bad_stage_list():
    out = _run("deepscaler.submit", "--stages", "1,x", "--dry-run")
    assert out.returncode == 2 and "--stages '1,x'" in out.stderr


def test_flags_in_the_recipes_style_are_overrides():
    from deepscaler.strict_yaml import flags_to_overrides

    assert flags_to_overrides(["--stage", "1", "--log.level", "debug", "--run.name=x", "a.b=1", "--dry-run"]) == [
        "--stage", "1", "log.level=debug", "run.name=x", "a.b=1", "--dry-run"]
    with pytest.raises(ConfigError, match=r"'--log.level': expected a value"):
        flags_to_overrides(["--log.level"])
    with pytest.raises(ConfigError, match=r"'--log.level': expected a value"):
        flags_to_overrides(["--log.level", "--dry-run"])


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "deepscaler.config", "yaml/stage1.yaml", "--log.level", "debug", "--run.name=flags"],
    [sys.executable, "-m", "deepscaler.submit", "--stage", "1", "--preset", "tiny-random", "--executor", "local",
     "--dry-run", "--log.level", "debug", "--run.name=flags"],
])
def test_commands_take_the_flag_style(argv):
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout[out.stdout.index("run:"):])
    assert cfg["log"]["level"] == "debug" and cfg["run"]["name"] == "flags"


def test_a_wrong_flag_key_is_the_override_error():
    out = subprocess.run([sys.executable, "-m", "deepscaler.config", "yaml/stage1.yaml", "--log.levle", "debug"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "unknown key 'log.levle' (did you mean 'log.level'?)" in out.stderr


def test_processes_take_the_flag_style_and_the_log_level(tmp_path):
    """The trainer, orchestrator and servers share process_parser and apply_process_settings."""
    import logging

    from deepscaler.config import load_config_args, parse_command_line, process_parser
    from deepscaler.process import apply_process_settings

    args = parse_command_line(process_parser("p", "doc"), ["--config", "yaml/stage1.yaml", "--log.level", "debug"])
    cfg = load_config_args(args.config, args.overrides)
    try:
        apply_process_settings(cfg, job=False)
        assert cfg.log.level == "debug" and logging.getLogger("deepscaler.trainer").isEnabledFor(logging.DEBUG)
    finally:
        logging.getLogger("deepscaler").setLevel(logging.NOTSET)
