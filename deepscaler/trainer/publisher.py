"""Publishing ``weights/step_N`` for the inference servers: the trainer's side of
``deepscaler.weights_format`` (the folder's layout, the probe, the checks consumers run).

Why the safetensors are written by ``deepscaler.safetensors_io`` and not by
``model.save_pretrained``: the writer takes a state dict from any source (a ZeRO-3 gather),
casts it to the publish dtype, and streams each tensor's bytes from its storage with one
device-to-host copy at a time (``safetensors.torch.save_file`` first copies *every* GPU tensor
to the host: a whole model of host memory), and never touches the live model's config. It is
as fast as save_pretrained for CPU tensors (1.5B bf16: 0.85-1.2 s each to page cache here) and
loads with ``from_pretrained`` to identical tensors (tested). It handles plain tensor names
only: a model class with a transformers-5 weight-conversion mapping (some MoE checkpoints)
would need ``save_pretrained``; Qwen2 has none.

The probe (``weights_format.probe_logprobs``) is computed on a model rebuilt from the exact
tensors written, so it is what a consumer computes after loading the folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from deepscaler.safetensors_io import write_safetensors_folder
from deepscaler.store import RunStore, atomic_write_json
from deepscaler.weights_format import (CONFIG_NAME, DEFAULT_MAX_SHARD_BYTES, PROBE_NAME, as_dtype, dtype_name,
                                       probe_logprobs, probe_token_ids, verify_weights_dir)


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
        checksums: dict[str, int] = {}  # of the safetensors, as streamed: the store reads back only the small files
        with store.write_step("weights", step, checksums=checksums) as tmp:
            write_safetensors_folder(tmp, tensors, max_shard_bytes=max_shard_bytes,
                                     total_parameters=sum(t.numel() for t in tensors.values()), checksums=checksums)
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
