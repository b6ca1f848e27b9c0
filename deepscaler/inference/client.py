"""The client side of the inference contract (docs/inference.md), for the orchestrator and eval.

HTTP through the standard library (http.client; no proxy from the environment); only
:func:`sync_weights` imports torch (for the probe comparison), lazily. Every response is checked
for shape before it is used: a server that answers with the wrong number of samples, or a token
list and a log-prob list of different lengths, must stop the run with an error naming that
server, not train on garbage. A request waits as long as a live
server works on it, but only ``liveness_timeout_s`` for one that stops answering /health.

    clients = wait_for_servers(store, ["server0", "server1"], timeout_s=900, procs=procs)
    for c in clients.values():
        sync_weights(c, store, step)          # update + probe check, or WeightSyncError
    gen = clients["server0"].generate(prompts, n=8, max_tokens=8192, temperature=0.6, top_p=1.0, seed=7)
"""

from __future__ import annotations

import hmac
import http.client
import json
import math
import os
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from deepscaler import handover
from deepscaler.errors import is_int, one_line
from deepscaler.inference.contract import TOKEN_ENV, hello_proof
from deepscaler.store import LOG_TAIL_LINES, RunStore
from deepscaler.store import log_tail as _file_tail

FINISH_REASONS = ("stop", "length")
LIVENESS_TIMEOUT_S = 60.0  # the default of inference.liveness_timeout_s
HEALTH_EVERY_S = 5.0  # how often a request in flight asks /health (at most; 4 times per liveness bound)


class ServerError(RuntimeError):
    """A server failed, refused or answered nonsense. The first line names the server and its
    address; ``status`` is the HTTP code when there was one."""

    def __init__(self, message: str, status: int | None = None, server: str | None = None):
        super().__init__(message)
        self.status = status
        self.server = server  # its name, for the log tail


class WeightSyncError(ServerError):
    """A server's probe log-probs after an update do not match the trainer's probe.json."""


class ServerGone(ServerError):
    """A server stopped answering /health for ``liveness_timeout_s`` while a request to it was
    in flight (stopped, hung, or its node lost): the request was abandoned, not retried."""


class ServerDied(ServerError):
    """A server's connection was refused or reset: its process is gone (a crash, an OOM kill, a
    GPU fault). Not retried: what killed it usually recurs (docs/design.md, "A server dies")."""


SERVER_DIED_EXIT = 3  # the orchestrator's exit code after a ServerDied: its supervisor names the dead server
_DEAD_PEER = (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
              http.client.IncompleteRead)


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
    """One server. ``token`` None: ``$DEEPSCALER_SERVER_TOKEN`` if set, else no auth header.
    With a token, the first request first has the server prove it holds the same token for
    this address (``POST /hello``, :meth:`_verify`): the address came from a file on a shared
    filesystem, and a listener that a forged file names must not receive the token."""

    def __init__(self, name: str, address: str, token: str | None = None, timeout_s: float = 3600.0,
                 liveness_timeout_s: float = LIVENESS_TIMEOUT_S):
        self.name, self.address, self.timeout_s = name, address, timeout_s
        self.liveness_timeout_s = liveness_timeout_s
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.verified = False  # the server proved it holds self.token (then the token may go)
        self._lock = threading.Lock()
        self._inflight: set[_InFlight] = set()
        self.closed = False

    def __repr__(self) -> str:
        return f"InferenceClient({self.name!r}, {self.address!r})"

    def _error(self, what: str, status: int | None = None) -> ServerError:
        return ServerError(f"server {self.name} ({self.address}): {what}", status, self.name)

    def _verify(self, timeout_s: float | None) -> None:
        """The server proves it holds our token: an HMAC of a fresh nonce and its address (a
        relay to a real server would prove the real server's address, not this one)."""
        nonce = secrets.token_hex(16)
        result = self._request("POST", "/hello", {"nonce": nonce}, timeout_s, watch=False, send_token=False)
        if not hmac.compare_digest(str(result.get("proof")), hello_proof(self.token, nonce, self.address)):
            raise self._error("did not prove that it holds this run's token, so the token was not sent: not one "
                              "of this run's servers (a stale or forged servers/*.addr file?)")
        self.verified = True

    def _request(self, method: str, path: str, body: Any = None, timeout_s: float | None = None,
                 watch: bool = True, send_token: bool = True) -> dict:
        """One request on a connection of its own. ``timeout_s`` (default ``self.timeout_s``)
        bounds how long a live server may take; with ``watch``, a server that stops answering
        /health is given up after ``liveness_timeout_s`` (:class:`_InFlight`)."""
        if send_token and self.token and not self.verified:
            self._verify(min(timeout_s or self.timeout_s, self.liveness_timeout_s))  # answered at once, like /health
        data = None if body is None else json.dumps(body).encode()
        headers = {"Connection": "close"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if send_token and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        timeout = timeout_s or self.timeout_s
        conn = flight = None
        try:
            # A frozen process's kernel still completes the handshake (its backlog); a lost host
            # or a full backlog never does: connecting is bounded by the liveness bound too.
            conn = http.client.HTTPConnection(self.address, timeout=min(timeout, self.liveness_timeout_s))
            with _InFlight(self, conn, f"{method} {path}", watch) as flight:
                conn.connect()
                conn.sock.settimeout(timeout)
                flight.connected()
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                status, raw = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            if flight is not None and flight.gone:
                raise ServerGone(f"server {self.name} ({self.address}): {flight.gone}", server=self.name) from None
            if flight is not None and flight.aborted:
                raise self._error(f"{method} {path} broken off: the client was closed (another request failed)") from None
            if isinstance(e, _DEAD_PEER):
                raise ServerDied(f"server {self.name} ({self.address}): {method} {path} failed: "
                                 f"{one_line(e) or type(e).__name__} (no server process there: it died, or never "
                                 "started)", server=self.name) from None
            raise self._error(f"{method} {path} failed: {one_line(e) or type(e).__name__}") from None
        finally:
            if conn is not None:
                conn.close()
        if status >= 400:
            detail = raw.decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise self._error(f"{method} {path} -> HTTP {status}: {one_line(detail)[:500]}", status)
        try:
            result = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(f"{method} {path} returned invalid JSON ({one_line(e)})") from None
        if not isinstance(result, dict):
            raise self._error(f"{method} {path} returned {type(result).__name__}, not a JSON object")
        return result

    def close(self) -> None:
        """Break off every request to this server in flight (each raises ServerError at once)
        and refuse new ones: for a caller that failed while other requests run, so that its
        process can exit instead of waiting for them."""
        with self._lock:
            self.closed = True
            flights = list(self._inflight)
        for flight in flights:
            flight.abort()

    def _field(self, result: dict, key: str, check, what: str, path: str) -> Any:
        if key not in result or not check(result[key]):
            raise self._error(f"{path} response: '{key}' missing or not {what}")
        return result[key]

    # ------------------------------------------------------------------ endpoints

    def health(self, timeout_s: float | None = None) -> dict:
        """Never waits longer than the liveness bound: /health does not queue behind a request."""
        result = self._request("GET", "/health", timeout_s=timeout_s or self.liveness_timeout_s, watch=False)
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


class _InFlight:
    """One request in flight, for :meth:`InferenceClient.close` and the liveness watch.

    Alive and done are apart: a live server may take up to ``timeout_s`` to answer (minutes
    of generation), but its /health, which never waits for the request lock, answers at once.
    With ``watch``, a thread asks /health on a connection of its own every few seconds; when
    none has answered for ``liveness_timeout_s`` (a SIGSTOPped, hung or lost server), it shuts
    the request's socket, so the blocked send or read returns, and ``gone`` says why."""

    def __init__(self, client: InferenceClient, conn: http.client.HTTPConnection, what: str, watch: bool):
        self.client, self.conn, self.what, self.watch = client, conn, what, watch
        self.gone: str | None = None
        self.aborted = False
        self._done = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> "_InFlight":
        with self.client._lock:
            self.client._inflight.add(self)
            self.aborted = self.client.closed
        if self.watch:
            threading.Thread(target=self._watch, name=f"liveness-{self.client.name}", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._done.set()
        with self.client._lock:
            self.client._inflight.discard(self)

    def connected(self) -> None:
        """Given up or closed before there was a socket to shut: shut it now."""
        with self._lock:
            if self.gone or self.aborted:
                self._shut()

    def abort(self) -> None:
        with self._lock:
            if not self._done.is_set():
                self.aborted = True
                self._shut()

    def _shut(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch(self) -> None:
        limit = self.client.liveness_timeout_s
        start = last_ok = time.monotonic()
        while not self._done.wait(min(HEALTH_EVERY_S, limit / 4)):
            left = limit - (time.monotonic() - last_ok)
            if left > 0:
                try:
                    self.client.health(timeout_s=left + 0.1)
                    last_ok = time.monotonic()
                    continue
                except ServerError:
                    pass
            if time.monotonic() - last_ok >= limit:
                with self._lock:
                    if not self._done.is_set():
                        self.gone = (f"{self.what} abandoned after {time.monotonic() - start:.0f} s: no answer to "
                                     f"GET /health for {limit:g} s (the server is stopped, hung, or its node lost; "
                                     f"inference.liveness_timeout_s)")
                        self._shut()
                return


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


# --------------------------------------------------------------------------- a dead server, for the supervisor

_SRUN_TASK_END = re.compile(r"^srun: error: (?P<node>\S+): tasks? (?P<tasks>[0-9][0-9,\-]*): (?P<how>.+)$", re.M)
_SIGNALS_BY_TEXT = {signal.strsignal(s): s for s in signal.Signals}  # "Killed" -> SIGKILL, as srun prints them


def how_it_ended(returncode: int) -> str:
    """'killed by signal 9 (SIGKILL)' or 'exited with code 1', from a Popen return code."""
    if returncode < 0:
        try:
            return f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def first_dead_task(step_log: str) -> tuple[str, int, str] | None:
    """(node, task, how it ended) of the first task that srun reported ending badly in a job
    step's log ("srun: error: node2: task 1: Killed"), or None. With ``--kill-on-bad-exit`` srun
    then stops the step's other tasks, so the first such line names the one that died first."""
    m = _SRUN_TASK_END.search(step_log)
    if m is None:
        return None
    how = m["how"].strip()
    code = re.fullmatch(r"Exited with exit code (\d+)", how)
    sig = _SIGNALS_BY_TEXT.get(how.removesuffix(" (core dumped)"))
    if code:
        how = f"exited with code {code[1]}"
    elif sig is not None:
        how = f"killed by signal {sig.value} ({sig.name}){' (core dumped)' if how.endswith('(core dumped)') else ''}"
    return m["node"], int(re.split(r"[,-]", m["tasks"])[0]), how


def resume_point(checkpoint: int | None) -> str:
    """Where ``--resume-step latest`` starts, as the lines that tell a user to resume say it."""
    return f"checkpoint step {checkpoint}" if checkpoint is not None else "the start: no checkpoint yet"


def server_died_line(name: str, node: str | None, address: str | None, how: str, stage: int, run: str,
                     step: int | None, checkpoint: int | None) -> str:
    """The one line a stage fails with when a server died: which one, where, how, and how to
    resume (docs/troubleshooting.md, "A server died")."""
    where = " ".join(x for x in (f"on {node}" if node else "", f"({address})" if address else "") if x)
    during = f" during step {step}" if step is not None else ""
    since = resume_point(checkpoint)
    return (f"server {name}{' ' + where if where else ''} died: {how}{during}; stage {stage} of run '{run}' stopped. "
            f"Resume with --resume-step latest (from {since}); see docs/troubleshooting.md#a-server-died")


def log_tail(store: RunStore, name: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of server ``name``'s ``logs/<name>.log``, for error messages."""
    return _file_tail(store.logs_dir / f"{name}.log", lines)


def wait_for_servers(store: RunStore, names: Sequence[str], timeout_s: float,
                     procs: Mapping[str, Any] | None = None, token: str | None = None,
                     poll_s: float = 0.5, liveness_timeout_s: float = LIVENESS_TIMEOUT_S) -> dict[str, InferenceClient]:
    """Wait until each named server has announced ``servers/<name>.addr`` and answers /health
    (as that name: a stale file of a dead predecessor does not count). Raises ServerError with
    the server's log tail if its process (``procs[name]``, a Popen) exits or time runs out.

    Frozen servers fail within ``liveness_timeout_s``, not ``timeout_s``: one of this attempt
    (started by a supervisor) whose start-up heartbeat (``handover/<name>.json``) stopped, and
    one that announced itself during this wait but answers no /health (frozen, or unreachable
    from here). An address already there when the wait began may be a dead predecessor's,
    which its successor replaces later: it gets the whole ``timeout_s``."""
    attempt = os.environ.get(handover.ATTEMPT_ENV)
    procs = procs or {}
    deadline = time.monotonic() + timeout_s
    ready: dict[str, InferenceClient] = {}
    last_error: dict[str, str] = {}
    before = store.read_server_addresses()
    fresh: dict[str, tuple[str, float]] = {}  # name -> (address announced during the wait, when first seen)
    beats: dict[str, tuple[float, float]] = {}  # name -> (its start-up heartbeat, when this wait saw it change)
    while True:
        addresses = store.read_server_addresses()
        for name in names:
            if name in ready:
                continue
            proc = procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"server {name} exited with code {proc.returncode} before it was ready\n"
                                  + log_tail(store, name))
            report = handover.read(store, name) if attempt else None
            if report and report.attempt == attempt:
                # Judged by this clock (when its beat last changed here), not by the server node's.
                if beats.get(name, (None,))[0] != report.updated:
                    beats[name] = (report.updated, time.monotonic())
                silent = time.monotonic() - beats[name][1]
                if silent > liveness_timeout_s:
                    raise ServerGone(f"server {name} (pid {report.pid} on {report.host}) has not reported for "
                                     f"{silent:.0f} s while starting (stopped, hung, or its node lost; "
                                     f"inference.liveness_timeout_s)\n" + log_tail(store, name), server=name)
            address = addresses.get(name)
            if address is None:
                before.pop(name, None)  # whatever comes next is announced during the wait
                continue
            if address != before.get(name) and fresh.get(name, ("",))[0] != address:
                fresh[name] = (address, time.monotonic())
            client = InferenceClient(name, address, token=token, liveness_timeout_s=liveness_timeout_s)
            try:
                health = client.health(timeout_s=min(10.0, liveness_timeout_s))
            except ServerError as e:
                last_error[name] = str(e)
                silent = time.monotonic() - fresh[name][1] if name in fresh else 0.0
                if silent >= liveness_timeout_s:
                    raise ServerGone(f"server {name} announced {address} {silent:.0f} s ago but has not answered "
                                     f"GET /health since (stopped, hung, or unreachable from this node; "
                                     f"inference.liveness_timeout_s; last error: {str(e).split('): ', 1)[-1]})\n"
                                     + log_tail(store, name),
                                     server=name) from None
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
