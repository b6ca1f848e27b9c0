"""Shared fixtures. Keep this file to fixtures only."""

import json

import pytest

pytest_plugins = ["tests.slurm_cluster"]

# What a tiny model folder holds next to its tokenizer: transformers 5 then reloads the
# tokenizer as Qwen2Tokenizer (the ENVIRONMENT.md pitfall), as the real pipeline will.
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
def reference_stage(tmp_path_factory):
    """One uninterrupted deterministic 4-step tiny stage (local executor), run once per session:
    the run that the resume and fault tests must reproduce bit for bit. Read it; copy its
    ``output_dir`` before changing anything in it."""
    from tests.helpers.chaos import REFERENCE_STEPS, reference_run

    return reference_run(tmp_path_factory.mktemp("reference-stage"), REFERENCE_STEPS)
