"""The client side of the inference contract (docs/inference.md), for the orchestrator and eval.

HTTP through the standard library (urllib); only :func:`sync_weights` imports torch (for
the probe comparison), lazily. Every response is checked for shape before it is used: a server that answers with the wrong
number of samples, or a token list and a log-prob list of different lengths, must stop the run
with an error naming that server, not train on garbage.

    clients = wait_for_servers(store, ["server0", "server1"], timeout_s=900, procs=procs)
    for c in clients.values():
        sync_weights(c, store, step)          # update + probe check, or WeightSyncError
    gen = clients["server0"].generate(prompts, n=8, max_tokens=8192, temperature=0.6, top_p=1.0, seed=7)
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from deepscaler.errors import is_int, one_line
from deepscaler.inference.contract import TOKEN_ENV
from deepscaler.store import LOG_TAIL_LINES, RunStore
from deepscaler.store import log_tail as _file_tail

FINISH_REASONS = ("stop", "length")


class ServerError(RuntimeError):
    """A server failed, refused or answered nonsense. The first line names the server and its
    address; ``status`` is the HTTP code when there was one."""

    def __init__(self, message: str, status: int | None = None, server: str | None = None):
        super().__init__(message)
        self.status = status
        self.server = server  # its name, for the log tail


class WeightSyncError(ServerError):
    """A server's probe log-probs after an update do not match the trainer's probe.json."""


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # per token, under the sampling distribution (temperature, top_p)
    finish_reason: str  # "stop" (eos, included in token_ids) or "length"
    truncated: bool  # hit max_tokens (or the context) without eos


@dataclass
class Generation:
    weight_step: int  # the weights every sample came from
    samples: list[list[Sample]]  # per prompt, n each


class InferenceClient:
    """One server. ``token`` None: ``$DEEPSCALER_SERVER_TOKEN`` if set, else no auth header."""

    def __init__(self, name: str, address: str, token: str | None = None, timeout_s: float = 3600.0):
        self.name, self.address, self.timeout_s = name, address, timeout_s
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)

    def __repr__(self) -> str:
        return f"InferenceClient({self.name!r}, {self.address!r})"

    def _error(self, what: str, status: int | None = None) -> ServerError:
        return ServerError(f"server {self.name} ({self.address}): {what}", status, self.name)

    def _request(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.address}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise self._error(f"{method} {path} -> HTTP {e.code}: {one_line(detail)[:500]}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise self._error(f"{method} {path} failed: {one_line(reason)}") from None
        try:
            result = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"{method} {path} returned invalid JSON ({one_line(e)})") from None
        if not isinstance(result, dict):
            raise self._error(f"{method} {path} returned {type(result).__name__}, not a JSON object")
        return result

    def _field(self, result: dict, key: str, check, what: str, path: str) -> Any:
        if key not in result or not check(result[key]):
            raise self._error(f"{path} response: '{key}' missing or not {what}")
        return result[key]

    # ------------------------------------------------------------------ endpoints

    def health(self, timeout_s: float | None = None) -> dict:
        result = self._request("GET", "/health", timeout_s=timeout_s)
        self._field(result, "weight_step", is_int, "an integer", "/health")
        return result

    def generate(self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float, seed: int | None = None) -> Generation:
        body = {"prompts": [list(map(int, p)) for p in prompts], "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed}
        result = self._request("POST", "/generate", body)
        step = self._field(result, "weight_step", is_int, "an integer", "/generate")
        per_prompt = self._field(result, "results", lambda r: isinstance(r, list) and len(r) == len(prompts),
                                 f"a list of {len(prompts)} (one per prompt)", "/generate")
        samples = []
        for i, group in enumerate(per_prompt):
            if not isinstance(group, list) or len(group) != n:
                raise self._error(f"/generate response: results[{i}] is not a list of {n} samples")
            samples.append([self._sample(s, f"results[{i}][{j}]") for j, s in enumerate(group)])
        return Generation(step, samples)

    def _sample(self, s: Any, where: str) -> Sample:
        if not isinstance(s, dict):
            raise self._error(f"/generate response: {where} is not an object")
        ids, lps = s.get("token_ids"), s.get("logprobs")
        finish, truncated = s.get("finish_reason"), s.get("truncated")
        ok = (isinstance(ids, list) and all(is_int(t) for t in ids)
              and isinstance(lps, list) and len(lps) == len(ids)
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) for x in lps)
              and finish in FINISH_REASONS and isinstance(truncated, bool))
        if not ok:
            raise self._error(f"/generate response: {where} is malformed (needs token_ids, logprobs of the "
                              f"same length, finish_reason in {FINISH_REASONS}, truncated)")
        return Sample([int(t) for t in ids], [float(x) for x in lps], finish, truncated)

    def probe(self, token_ids: Sequence[int]) -> tuple[int, list[float]]:
        """(weight_step, log p(token_t | tokens_<t) for t >= 1) computed by the server's engine."""
        ids = [int(t) for t in token_ids]
        result = self._request("POST", "/probe", {"token_ids": ids})
        step = self._field(result, "weight_step", is_int, "an integer", "/probe")
        lps = self._field(result, "logprobs", lambda x: isinstance(x, list) and len(x) == len(ids) - 1,
                          f"a list of {len(ids) - 1} log-probs", "/probe")
        return step, [float(x) for x in lps]

    def update_weights(self, step: int, path: str | os.PathLike) -> dict:
        """Have the server load ``weights/step_N``: {"weight_step", "seconds", "method", "prefix_cache_reset"}."""
        result = self._request("POST", "/update_weights", {"step": step, "path": str(path)})
        self._field(result, "weight_step", is_int, "an integer", "/update_weights")
        return result


# --------------------------------------------------------------------------- helpers


def sync_weights(client: InferenceClient, store: RunStore, step: int) -> dict:
    """Update one server to ``weights/step_N`` and prove it holds them: its probe log-probs
    must match the trainer's probe.json (``compare_probe``). Returns the update report plus
    ``probe_max_diff``; raises WeightSyncError naming the server, the step and the difference."""
    from deepscaler.weights_format import PROBE_TOLERANCES, compare_probe, dtype_name, read_probe

    folder = store.step_dir("weights", step)  # StepNotFound (one line) if it is not stable
    report = client.update_weights(step, folder)
    if report["weight_step"] != step:
        raise WeightSyncError(f"server {client.name} ({client.address}) reports weights step "
                              f"{report['weight_step']} after loading step {step}")
    probe = read_probe(folder)
    served_step, actual = client.probe(probe["token_ids"])
    if served_step != step:
        raise WeightSyncError(f"server {client.name} ({client.address}) probed at weights step {served_step}, "
                              f"expected {step} (another update raced this one)")
    ok, diff = compare_probe(probe["logprobs"], actual, probe["dtype"])
    if not ok:
        atol, rtol, mean_tol = PROBE_TOLERANCES[dtype_name(probe["dtype"])]
        raise WeightSyncError(
            f"server {client.name} ({client.address}) failed the weight-sync probe for weights step {step}: "
            f"max |Δlogprob| = {diff:.3g} (tolerance {atol:g} + {rtol:g}·|logprob| per token, mean {mean_tol:g}, "
            f"{probe['dtype']}); the reload was partial or wrong"
        )
    return {**report, "probe_max_diff": diff}


def log_tail(store: RunStore, name: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of server ``name``'s ``logs/<name>.log``, for error messages."""
    return _file_tail(store.logs_dir / f"{name}.log", lines)


def wait_for_servers(store: RunStore, names: Sequence[str], timeout_s: float,
                     procs: Mapping[str, Any] | None = None, token: str | None = None,
                     poll_s: float = 0.5) -> dict[str, InferenceClient]:
    """Wait until each named server has announced ``servers/<name>.addr`` and answers /health
    (as that name: a stale file of a dead predecessor does not count). Raises ServerError with
    the server's log tail if its process (``procs[name]``, a Popen) exits or time runs out."""
    procs = procs or {}
    deadline = time.monotonic() + timeout_s
    ready: dict[str, InferenceClient] = {}
    last_error: dict[str, str] = {}
    while True:
        addresses = store.read_server_addresses()
        for name in names:
            if name in ready:
                continue
            proc = procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"server {name} exited with code {proc.returncode} before it was ready\n"
                                  + log_tail(store, name))
            address = addresses.get(name)
            if address is None:
                continue
            client = InferenceClient(name, address, token=token)
            try:
                health = client.health(timeout_s=10.0)
            except ServerError as e:
                last_error[name] = str(e)
                continue
            if health.get("name") == name and health.get("status") == "ok":
                ready[name] = client
            else:
                last_error[name] = f"{address} answers as {health.get('name')!r}, status {health.get('status')!r}"
        if len(ready) == len(names):
            return {name: ready[name] for name in names}
        if time.monotonic() >= deadline:
            name = next(n for n in names if n not in ready)
            addresses = store.read_server_addresses()
            state = (f"announced {addresses[name]}, last error: {last_error.get(name, 'none')}"
                     if name in addresses else f"no {store.server_file(name)}")
            raise ServerError(f"server {name} was not ready within {timeout_s:.0f} s ({state})\n"
                              + log_tail(store, name))
        time.sleep(poll_s)
