"""Shared fixtures. Keep this file to fixtures only."""

import json
import os

import pytest
import torch

from deepscaler.trainer.engine import free_port

pytest_plugins = ["tests.slurm_cluster"]

# What a tiny model folder holds next to its tokenizer: transformers 5 then reloads the
# tokenizer as Qwen2Tokenizer, as the real pipeline will
# (docs/platform-notes.md#transformers-5-the-tokenizer-reload-pitfall).
QWEN2_CONFIG = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """The tiny preset's tokenizer, built once (~1 s) and saved beside a qwen2 config.json."""
    from deepscaler.tiny import build_tokenizer, save_tokenizer

    directory = save_tokenizer(build_tokenizer(), tmp_path_factory.mktemp("tiny_tokenizer"))
    (directory / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer as every consumer sees it: loaded back with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def vocab(tiny_tokenizer) -> int:
    """The tiny tokenizer's vocabulary size (a tiny model's embedding rows)."""
    return len(tiny_tokenizer)


@pytest.fixture(scope="session")
def reference_stage(tmp_path_factory):
    """One uninterrupted deterministic 4-step tiny stage (local executor), run once per session:
    the run that the resume and fault tests must reproduce bit for bit. Read it; copy its
    ``output_dir`` before changing anything in it."""
    from tests.helpers.chaos import REFERENCE_STEPS, reference_run

    return reference_run(tmp_path_factory.mktemp("reference-stage"), REFERENCE_STEPS)


@pytest.fixture(scope="session")
def process_group():
    """One gloo rank for the whole session (DeepSpeed needs a process group even alone). Once
    per session: DeepSpeed keeps a handle on the first group it saw, so a group destroyed and
    made anew in the same process breaks the next engine."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a 27 s g++ build
    ours = not torch.distributed.is_initialized()
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if ours:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    if ours:
        torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def dist(process_group):
    """The session's gloo rank, in deterministic mode for the module's tests."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was_deterministic)
