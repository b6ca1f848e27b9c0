"""Resumable trainer checkpoints without pickle: ``checkpoints/step_N`` in safetensors + JSON.

DeepSpeed's ``engine.save_checkpoint``/``load_checkpoint`` go through ``torch.save``/``torch.load``
(pickle), and loading pickle from a shared filesystem runs whatever code the file names. So we
take the same pieces DeepSpeed would (the optimizer wrapper's ``state_dict()``, the module's
weights, the lr schedule, the engine's counters) and store tensors with safetensors and
everything else as JSON::

    checkpoints/step_N/
      trainer_state.json        step, world size, ZeRO stage, model fingerprint, scheduler,
                                engine counters, versions, and the caller's ``progress`` dict
      model.safetensors         full fp32 module state (rank 0; gathered under ZeRO-3), any
                                world size can read it: resume, stage K+1 init, weights-only
      rank_<r>.safetensors      rank r's optimizer tensors (fp32 master partition, Adam moments,
                                step counts) and its torch RNG states
      rank_<r>.json             rank r's optimizer state *tree* (tensor leaves point into the
                                .safetensors file), its python/numpy RNG states and the node
                                that wrote it
      STABLE                    written by RunStore.write_step, with a file-size manifest

Non-JSON, non-tensor leaves of the optimizer state (DeepSpeed's loss-scaler object, fragment
addresses) are not stored: at load time they are taken from the live engine's fresh state.

Multi-rank: rank 0 opens ``store.write_step``, broadcasts the temp dir, every rank writes and
fsyncs its own pair, the ranks agree (a failure on any rank fails all, so nobody hangs), then
rank 0 renames and marks the step STABLE. Loading validates every file a rank needs *before*
touching the engine or joining a collective, and the ranks agree on the outcome the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepscaler.errors import one_line
from deepscaler.faults import maybe_crash
from deepscaler.safetensors_io import load_tensors, read_safetensors_header, save_tensors
from deepscaler.store import STABLE, CorruptFileError, RunStore, StoreError, atomic_write_json, read_json
from deepscaler.trainer.engine import node_name

log = logging.getLogger("deepscaler.trainer")

FORMAT_VERSION = 1
TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


class CheckpointError(StoreError):
    """A checkpoint that cannot be written or loaded. The message is one line."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not fit the live engine (model shape, world size, ZeRO stage)."""


def rank_tensor_file(rank: int) -> str:
    return f"rank_{rank}.safetensors"


def rank_json_file(rank: int) -> str:
    return f"rank_{rank}.json"


# --------------------------------------------------------------------------- ranks


class _Ranks:
    """The default process group, or a lone rank when torch.distributed is not initialised."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (over the wire, not through the filesystem)."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: str | None) -> list[str]:
        """Every rank's error (if any), on every rank. Also a barrier."""
        if self.world == 1:
            return [error] if error else []
        out: list[str | None] = [None] * self.world
        self.dist.all_gather_object(out, error)
        return [e for e in out if e]


def _describe(err: BaseException) -> str:
    return one_line(err) if isinstance(err, StoreError) else f"{type(err).__name__}: {one_line(err)}"


# --------------------------------------------------------------------------- state trees
#
# A state tree (nested dict/list/tuple) becomes JSON where every node says what it was:
#   {"tensor": key}  the tensor is ``key`` in the rank's safetensors file
#   {"value": x}     a JSON scalar (None, bool, int, float, str; IntEnum is stored as int)
#   {"dict": [[k, node], ...]}, {"list": [...]}, {"tuple": [...]}   keys keep their type (int/str)
#   {"live": "TypeName"}   not stored: taken from the live engine's state at load time

def _encode_tree(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        if path in tensors:
            raise CheckpointError(f"duplicate tensor key {path!r} while flattening a state tree")
        tensors[path] = obj
        return {"tensor": path}
    if isinstance(obj, bool) or obj is None or type(obj) in (float, str):
        return {"value": obj}
    if isinstance(obj, int):  # also IntEnum (ZeroStageEnum): JSON keeps the number
        return {"value": int(obj)}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                items.append([repr(k), {"live": f"key {type(k).__name__}"}])
                continue
            items.append([int(k) if isinstance(k, int) else k, _encode_tree(v, f"{path}/{k}", tensors)])
        return {"dict": items}
    if type(obj) is list or type(obj) is tuple:
        kind = "list" if type(obj) is list else "tuple"
        return {kind: [_encode_tree(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    return {"live": type(obj).__name__}


_MISSING = object()


def _child(live: Any, key: Any) -> Any:
    try:
        if isinstance(live, dict):
            return live.get(key, _MISSING)
        if isinstance(live, (list, tuple)) and isinstance(key, int) and 0 <= key < len(live):
            return live[key]
    except TypeError:
        pass
    return _MISSING


def _decode_tree(node: Any, live: Any, tensors: dict[str, torch.Tensor], file: Path, where: str) -> Any:
    """Rebuild a tree; tensor leaves are checked against the live tree where it has them."""
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"{file}: malformed state tree at {where or '/'}")
    (kind, body), = node.items()
    if kind == "tensor":
        if body not in tensors:
            raise CheckpointError(f"{file}: tensor '{body}' is missing from the tensor file")
        t = tensors[body]
        if torch.is_tensor(live) and (live.shape != t.shape or live.dtype != t.dtype):
            raise CheckpointMismatch(
                f"{file}: tensor '{body}' is {t.dtype} {list(t.shape)} but the live engine has "
                f"{live.dtype} {list(live.shape)} (checkpoint from a different model shape)"
            )
        return t
    if kind == "value":
        return body
    if kind == "live":
        if live is _MISSING:
            raise CheckpointError(f"{file}: {body} at {where or '/'} is not stored and the live engine has none")
        return live
    if kind == "dict":
        out = {}
        for k, v in body:
            if isinstance(v, dict) and v.get("live", "").startswith("key "):
                continue  # a non-JSON key: nothing to restore
            out[k] = _decode_tree(v, _child(live, k), tensors, file, f"{where}/{k}")
        return out
    if kind in ("list", "tuple"):
        items = [_decode_tree(v, _child(live, i), tensors, file, f"{where}/{i}") for i, v in enumerate(body)]
        return items if kind == "list" else tuple(items)
    raise CheckpointError(f"{file}: unknown node kind {kind!r} at {where or '/'}")


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: it refuses tensors that share storage (the ZeRO-1/2
    module params are views into one flat buffer), so views and repeats are copied."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size() and t.is_contiguous()
        if storage.data_ptr() in seen or not whole:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


# --------------------------------------------------------------------------- RNG


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This rank's RNG states: python and numpy as JSON, torch's byte tensors for safetensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    return state, tensors


def _set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch_cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


# --------------------------------------------------------------------------- model state


def _module_entries(module) -> dict[str, torch.Tensor]:
    """``module.state_dict(keep_vars=True)``: the live Parameters (ZeRO-3 ones are partitioned)
    and persistent buffers, under every name the module loads them by (tied weights twice)."""
    return module.state_dict(keep_vars=True)


def _full_shape(t: torch.Tensor) -> list[int]:
    return list(getattr(t, "ds_shape", t.shape))


def model_fingerprint(module) -> str:
    """Hash of parameter/buffer names and full shapes: the same model architecture and size."""
    spec = [[k, _full_shape(v)] for k, v in sorted(_module_entries(module).items())]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _zero_stage(engine) -> int:
    fn = getattr(engine, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else 0


def _full_fp32_state(engine, ranks: _Ranks) -> dict[str, torch.Tensor] | None:
    """The full fp32 module state on rank 0 (None elsewhere). Collective: all ranks call it.

    fp32 params of ZeRO 0-2 are the master weights already (DeepSpeed copies the master into
    them after every step), so they are taken as they are. Lower-precision params come from
    their fp32 masters: ZeRO-1/2/3 and the bf16 optimizer gather them parameter by parameter;
    stage 0's unfused fp16/bf16 wrapper keeps them in ``fp32_groups`` beside ``fp16_groups``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    unfused = {}
    opt = engine.optimizer
    if isinstance(getattr(opt, "fp16_groups", None), list) and isinstance(getattr(opt, "fp32_groups", None), list):
        for low, high in zip(opt.fp16_groups, opt.fp32_groups):
            if isinstance(low, list) and isinstance(high, list):
                unfused.update({id(lp): hp for lp, hp in zip(low, high) if lp.shape == hp.shape})
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, t in _module_entries(engine.module).items():
        if id(t) in done:
            full = done[id(t)]
        elif id(t) in unfused and not hasattr(t, "ds_id"):
            full = unfused[id(t)].detach().float() if ranks.rank == 0 else None
        elif hasattr(t, "ds_id") or (isinstance(t, torch.nn.Parameter) and t.dtype != torch.float32
                                     and getattr(t, "_hp_mapping", None) is not None):
            full = safe_get_full_fp32_param(t)
            if full is None:  # a frozen ZeRO-3 param: no fp32 master, gather the param itself
                import deepspeed

                with deepspeed.zero.GatheredParameters([t]):
                    full = t.detach().float().cpu().clone() if ranks.rank == 0 else None
            elif ranks.rank == 0:
                full = full.detach().float().cpu()
        elif ranks.rank == 0:
            full = t.detach().float() if t.is_floating_point() else t.detach()
        else:
            full = None
        done[id(t)] = full
        if ranks.rank == 0:
            out[name] = full
    return out if ranks.rank == 0 else None


def full_model_state(engine) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights on rank 0, None elsewhere (what a checkpoint stores).
    Collective: every rank calls it."""
    return _full_fp32_state(engine, _Ranks())


def publish_state(engine, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The full weights in the publish ``dtype`` on rank 0, where the module lives (its GPU);
    None elsewhere. Collective: every rank calls it.

    Why not the fp32 masters: for the 1.5B model that is 7.1 GB gathered to the host at every
    step, to be cast to bf16 there. Under ZeRO 0-2 every rank holds the whole module in its
    compute dtype, and DeepSpeed copies the fp32 master into it after each step with the
    same round-to-nearest a cast does, so when the compute dtype is the publish dtype the
    module's own tensors are published, uncopied. Under ZeRO-3 each parameter is gathered in
    turn and rank 0 keeps a copy (3.55 GB of bf16 on its GPU for the 1.5B model).
    """
    import deepspeed

    rank = _Ranks().rank
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}
    for name, t in _module_entries(engine.module).items():
        if id(t) not in done:
            if hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t]):
                    done[id(t)] = t.detach().to(dtype, copy=True) if rank == 0 else None
            else:
                done[id(t)] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        if rank == 0:
            out[name] = done[id(t)]
    return out if rank == 0 else None


# --------------------------------------------------------------------------- save


def save_checkpoint(store: RunStore, step: int, engine, *, scheduler=None, progress: dict | None = None) -> Path:
    """Publish ``checkpoints/step_N`` with everything a bit-exact resume needs. Collective:
    every rank calls it. Returns the step directory (STABLE on return, on every rank)."""
    ranks = _Ranks()
    stage = _zero_stage(engine)
    # Collectives first (ZeRO-3 gathers), while every rank is sure to be here.
    model_state = _full_fp32_state(engine, ranks)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_tree = _encode_tree(engine.optimizer.state_dict(), "optimizer", opt_tensors)
    rng_json, rng_tensors = _rng_state()

    writer = None
    started: str | None = None
    if ranks.rank == 0:
        writer = store.write_step("checkpoints", step)
        try:
            started = str(writer.__enter__())
        except Exception as err:  # StepExists, disk full: tell the other ranks before raising
            started = None
            ranks.broadcast({"error": _describe(err)})
            raise
    shared = ranks.broadcast({"tmp": started})
    if shared.get("error"):
        raise CheckpointError(f"rank 0 could not start checkpoint step {step}: {shared['error']}")
    tmp = Path(shared["tmp"])

    local: BaseException | None = None
    try:
        save_tensors(tmp / rank_tensor_file(ranks.rank), _storable({**opt_tensors, **rng_tensors}),
                     metadata={"format": str(FORMAT_VERSION), "rank": str(ranks.rank), "step": str(step)})
        atomic_write_json(tmp / rank_json_file(ranks.rank),
                          {"format": FORMAT_VERSION, "rank": ranks.rank, "step": step, "node": node_name(),
                           "optimizer": opt_tree, "rng": rng_json}, indent=None)
        if ranks.rank == 0:
            save_tensors(tmp / MODEL_FILE, _storable(model_state), metadata={"format": "pt", "step": str(step)})
            atomic_write_json(tmp / TRAINER_STATE, _trainer_state(step, engine, stage, ranks, scheduler, progress))
        maybe_crash("checkpoint.mid_write", step)
    except Exception as err:
        local = err
    errors = ranks.agree(f"rank {ranks.rank}: {_describe(local)}" if local else None)

    published: BaseException | None = None
    if writer is not None:
        try:
            if errors:
                exc = local or CheckpointError(errors[0])
                writer.__exit__(type(exc), exc, exc.__traceback__)  # removes the temp dir
            else:
                writer.__exit__(None, None, None)  # fsync, rename, STABLE
        except Exception as err:
            published = err
    final = ranks.agree(f"rank 0: {_describe(published)}" if published else None)
    if errors:
        if local is not None:
            raise local
        raise CheckpointError(f"checkpoint step {step} failed on {errors[0]}")
    if final:
        if published is not None:
            raise published
        raise CheckpointError(f"checkpoint step {step} could not be published: {final[0]}")
    return store.step_path("checkpoints", step)


def _trainer_state(step: int, engine, stage: int, ranks: _Ranks, scheduler, progress: dict | None) -> dict:
    import deepspeed

    sched = None
    if scheduler is not None:
        sched = scheduler.state_dict()
        try:
            json.dumps(sched)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"the lr scheduler state is not JSON ({one_line(err)}); use plain lambdas") from None
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": ranks.world,
        "zero_stage": stage,
        "model_fingerprint": model_fingerprint(engine.module),
        "engine": {k: int(getattr(engine, k)) for k in ENGINE_COUNTERS if hasattr(engine, k)},
        "scheduler": sched,
        "progress": progress if progress is not None else {},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "created_unix": time.time(),
    }


# --------------------------------------------------------------------------- load


def _check_stable(path: Path, files: list[str]) -> None:
    """A complete checkpoint, and ``files`` as large as the manifest says (catches truncation)."""
    marker = path / STABLE
    if not marker.is_file():
        state = "does not exist" if not path.exists() else "has no STABLE marker (unfinished or being deleted)"
        raise CheckpointError(f"{path} {state}; not a loadable checkpoint")
    sizes = read_json(marker).get("files", {})
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if name in sizes and f.stat().st_size != sizes[name]:
            raise CorruptFileError(
                f"{f}: {f.stat().st_size} bytes but the STABLE manifest says {sizes[name]} (truncated or replaced)"
            )


def _check_model_file(file: Path, module) -> None:
    """Names and full shapes in ``model.safetensors`` (header only) against the live module."""
    header = read_safetensors_header(file)  # CorruptFileError naming the file
    saved = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    live = {k: _full_shape(v) for k, v in _module_entries(module).items()}
    for key, shape in live.items():
        if key not in saved:
            raise CheckpointMismatch(f"{file}: no tensor '{key}' (checkpoint from a different model shape)")
        if saved[key] != shape:
            raise CheckpointMismatch(
                f"{file}: tensor '{key}' has shape {saved[key]} but the live model has {shape} "
                f"(checkpoint from a different model shape)"
            )
    extra = sorted(set(saved) - set(live))
    if extra:
        raise CheckpointMismatch(f"{file}: unexpected tensor '{extra[0]}' (checkpoint from a different model shape)")


def _load_rank_files(path: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor], Path]:
    tfile = path / rank_tensor_file(rank)
    meta = read_json(path / rank_json_file(rank))
    tensors = load_tensors(tfile)
    if meta.get("rank") != rank:
        raise CheckpointError(f"{path / rank_json_file(rank)}: written by rank {meta.get('rank')}, not {rank}")
    return meta, tensors, tfile


def load_checkpoint(path, engine, *, scheduler=None, load_optimizer: bool = True, restore_rng: bool = True) -> dict:
    """Restore ``engine`` (and ``scheduler``, and this rank's RNG) from ``checkpoints/step_N``.

    Collective: every rank calls it. ``load_optimizer=False`` loads the weights only (any world
    size or ZeRO stage) and re-derives the fp32 masters from them. Returns the trainer state
    (``step``, ``world_size``, ``zero_stage``, ``progress``, ...). Every file is read and checked
    before the engine changes, so a failed load raises on all ranks and leaves the engine as it was.
    """
    path = Path(path)
    ranks = _Ranks()
    stage = _zero_stage(engine)
    # Under ZeRO-3 with the optimizer, the fp32 partitions carry the weights: skip the big file.
    need_model = not (stage == 3 and load_optimizer)
    read_model = need_model and (stage != 3 or ranks.rank == 0)

    local: BaseException | None = None
    state = rank_meta = rank_tensors = model_sd = opt_state = None
    restore_this_rng = restore_rng
    try:
        _check_stable(path, [TRAINER_STATE, MODEL_FILE])
        state = read_json(path / TRAINER_STATE)
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path / TRAINER_STATE}: format {state.get('format')!r}, expected {FORMAT_VERSION}")
        _check_model_file(path / MODEL_FILE, engine.module)
        same_layout = state["world_size"] == ranks.world and state["zero_stage"] == stage
        if load_optimizer and not same_layout:
            raise CheckpointMismatch(
                f"{path}: saved with world size {state['world_size']} and ZeRO stage {state['zero_stage']}, "
                f"this run has world size {ranks.world} and ZeRO stage {stage}; the optimizer state cannot be "
                f"re-partitioned: resume with the trainer shape it was saved with (or start a new stage from "
                f"it with checkpoint.load_optimizer=false to load the weights only)"
            )
        if restore_rng and state["world_size"] != ranks.world:
            log.warning("%s: saved with world size %d, now %d: RNG states not restored",
                        path, state["world_size"], ranks.world)
            restore_this_rng = False
        if load_optimizer or restore_this_rng:
            _check_stable(path, [rank_tensor_file(ranks.rank), rank_json_file(ranks.rank)])
            rank_meta, rank_tensors, tfile = _load_rank_files(path, ranks.rank)
            if load_optimizer:
                live = engine.optimizer.state_dict()
                opt_state = _decode_tree(rank_meta["optimizer"], live, rank_tensors, tfile, "")
                if getattr(engine.optimizer, "elastic_checkpoint", False):
                    # Elastic ZeRO-1/2 state merges every rank's partition: read the others too.
                    opt_state = [opt_state if r == ranks.rank else _read_optimizer(path, r, live)
                                 for r in range(ranks.world)]
        if read_model:
            model_sd = load_tensors(path / MODEL_FILE)
        if scheduler is not None and state.get("scheduler") is None:
            raise CheckpointError(f"{path / TRAINER_STATE}: no lr scheduler state saved")
    except Exception as err:
        local = err
    errors = ranks.agree(f"rank {ranks.rank}: {_describe(local)}" if local else None)
    if local is not None:
        raise local
    if errors:
        raise CheckpointError(f"loading {path} failed on {errors[0]}")

    _restore_engine(engine, stage, ranks, model_sd, need_model, opt_state)
    if load_optimizer:
        for k, v in state.get("engine", {}).items():
            if hasattr(engine, k):
                setattr(engine, k, v)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
        if not load_optimizer:  # the lr lives in the optimizer's param groups too
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
    if restore_this_rng:
        _set_rng_state(rank_meta["rng"], rank_tensors)
    return state


def _read_optimizer(path: Path, rank: int, live: Any) -> Any:
    _check_stable(path, [rank_tensor_file(rank), rank_json_file(rank)])
    meta, tensors, tfile = _load_rank_files(path, rank)
    return _decode_tree(meta["optimizer"], live, tensors, tfile, "")


def _restore_engine(engine, stage: int, ranks: _Ranks, model_sd, need_model: bool, opt_state) -> None:
    """Put validated state into the engine, the way DeepSpeed's own load_checkpoint orders it."""
    optimizer = engine.optimizer
    module = engine.module
    if stage == 3:
        import deepspeed

        optimizer.checkpoint_event_prologue()  # partition every parameter, persistent ones too
        if need_model:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                if ranks.rank == 0:
                    with torch.no_grad():
                        module.load_state_dict(model_sd, strict=True)
            optimizer.refresh_fp32_params()
        if opt_state is not None:
            _load_optimizer(optimizer, opt_state, ranks)
        optimizer.checkpoint_event_epilogue()
        return
    if need_model:
        with torch.no_grad():
            module.load_state_dict(model_sd, strict=True)
    if opt_state is not None:
        _load_optimizer(optimizer, opt_state, ranks)
    elif hasattr(optimizer, "refresh_fp32_params"):  # ZeRO-1/2, fp16/bf16 wrappers: masters from weights
        optimizer.refresh_fp32_params()


def _load_optimizer(optimizer, opt_state, ranks: _Ranks) -> None:
    """ZeRO (and bf16) wrappers take one state dict per rank and restore the exact fp32 masters
    with ``load_from_fp32_weights``; a plain torch optimizer (stage 0, fp32) takes its own."""
    params = inspect.signature(optimizer.load_state_dict).parameters
    if "state_dict_list" in params:
        per_rank = opt_state if isinstance(opt_state, list) else [opt_state] * ranks.world
        optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(opt_state)


def load_model_weights(path, module, *, strict: bool = True) -> dict:
    """Load only ``model.safetensors`` into a plain (not ZeRO-3 partitioned) module, e.g. the
    model stage K+1 starts from. Any world size or ZeRO stage. Returns the trainer state."""
    path = Path(path)
    _check_stable(path, [TRAINER_STATE, MODEL_FILE])
    state = read_json(path / TRAINER_STATE)
    if strict:
        _check_model_file(path / MODEL_FILE, module)
    sd = load_tensors(path / MODEL_FILE)
    with torch.no_grad():
        module.load_state_dict(sd, strict=strict)
    return state
