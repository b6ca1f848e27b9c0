"""The inference server process: one HTTP contract, two backends (transformers, vLLM).

    python -m deepscaler.inference --config RUN/stageK/run.yaml --name server0 \\
        [--host H] [--port 0] [--weights-step N|latest|base] [key=value ...]

Why a contract of our own rather than vLLM's OpenAI server: the trainer needs, per sampled
token, its log-prob under the *sampling* distribution, and every weight update must drain
requests, reset the prefix cache and be verified; the tiny preset must serve exactly the same
API from transformers on a CPU. docs/inference.md is the reference; in short:

    GET  /health          {"status", "weight_step", "backend", "model", "dtype", "name"}
    POST /generate        {"prompts": [[ids]], "n", "max_tokens", "temperature", "top_p", "seed"}
    POST /probe           {"token_ids": [ids]} -> prompt log-probs at temperature 1
    POST /update_weights  {"step", "path"} -> reload weights/step_N (drained, leased, cache reset)

Requests run one at a time (a lock): an update waits for the generate in flight, and a
generate never sees half-loaded weights. /health never waits. Send a step's prompts in one
/generate request: the backend batches inside a request, not across requests.

The address is announced (``servers/<name>.addr``) only once the model is loaded, and removed
on SIGTERM/SIGINT (exit 0). Every request needs ``Authorization: Bearer $DEEPSCALER_SERVER_TOKEN``;
a server without that variable refuses to start, unless ``--no-auth`` on a loopback address.
``POST /hello {"nonce"}`` (no token needed) answers ``contract.hello_proof``: a client checks it
before it sends the token to an address read from the shared filesystem. Logs go to stderr.
What the backends share with the server (the request type, per-sample seeds, eos ids, the max
model length) is in ``contract.py``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deepscaler import cuda_preflight, faults, handover
from deepscaler.config import Config, ConfigError, load_config_args, parse_command_line, process_parser
from deepscaler.errors import is_int, one_line
from deepscaler.handover import ATTEMPT_ENV, HEARTBEAT_S, Reporter
from deepscaler.inference.contract import (TOKEN_ENV, Backend, BackendDead, GenerateRequest, hello_proof, max_model_len,
                                           request_seed)
from deepscaler.process import apply_process_settings, usable_cpus, visible_gpus
from deepscaler.store import RunStore, StepNotFound, StoreError

log = logging.getLogger("deepscaler.inference")

# weight_step values that are not a published step.
BASE_STEP = -1  # started from the base model (model.name), not from weights/step_N
UNKNOWN_STEP = -2  # an update failed part-way: the weights are unknown until the next update
MAX_BODY_BYTES = 256 * 2**20  # without a config (tests); a server's own limit is RequestLimits.max_body_bytes
MAX_SAMPLES = 1024  # n per prompt
STOP_GRACE_S = 10.0  # on SIGTERM, how long to wait for the request in flight
MAX_PARSES = 4  # requests with a body in memory at once (a parsed body costs ~6x its size)
HELLO_MAX_BYTES = 1024  # /hello is answered before the token is checked
# An eval sends a whole benchmark in one request; the largest bundled one (olympiad_bench) has
# 675 problems (tests/unit/test_security.py keeps every bundled benchmark within this).
EVAL_MAX_PROMPTS = 1024


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a server, from the config: never less than the orchestrator
    (one step's prompts, even if they all went to one server) or an eval (a whole benchmark,
    each benchmark's samples) sends, so a legitimate request is never refused."""

    max_prompts: int
    max_samples: int  # prompts x n
    max_body_bytes: int

    @classmethod
    def of(cls, cfg: Config, model_len: int, vocab_size: int) -> "RequestLimits":
        prompts = max(cfg.orchestrator.prompts_per_step, EVAL_MAX_PROMPTS)
        eval_n = max((b.samples for b in cfg.eval.benchmarks.values()), default=1)
        samples = max(cfg.orchestrator.prompts_per_step * cfg.sampling.samples_per_prompt, EVAL_MAX_PROMPTS * eval_n)
        # JSON of the longest prompts: each id is at most len(str(vocab_size - 1)) digits plus ", ".
        per_token = len(str(max(vocab_size - 1, 0))) + 2
        return cls(prompts, samples, prompts * (model_len - 1) * per_token + 2**20)


DEFAULT_LIMITS = RequestLimits(EVAL_MAX_PROMPTS, EVAL_MAX_PROMPTS * MAX_SAMPLES, MAX_BODY_BYTES)


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP code. The message is one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- request validation


def _is_number(x: Any) -> bool:
    return (is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _check_keys(body: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    missing = [k for k in required if k not in body]
    if missing:
        raise RequestError(f"missing field '{missing[0]}'")
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise RequestError(f"unknown field '{unknown[0]}' (fields: {', '.join(required + optional)})")
    return body


def _check_ids(ids: Any, field: str, max_model_len: int, vocab_size: int, min_len: int = 1) -> list[int]:
    """A list of token ids that fits the model: in range, at least ``min_len``, and leaving
    room for one more token (a prompt must be shorter than the max model length)."""
    if not isinstance(ids, list):
        raise RequestError(f"{field} must be a list of token ids, got {type(ids).__name__}")
    if len(ids) < min_len:
        raise RequestError(f"{field} has {len(ids)} tokens; it needs at least {min_len}")
    if len(ids) >= max_model_len:
        raise RequestError(f"{field} has {len(ids)} tokens; the server's max model length is "
                           f"{max_model_len} (prompt tokens must be fewer)")
    for j, t in enumerate(ids):
        if not is_int(t) or not 0 <= t < vocab_size:
            raise RequestError(f"{field}[{j}] must be a token id in [0, {vocab_size}), got {t!r}")
    return ids


def parse_generate(body: Any, max_model_len: int, vocab_size: int,
                   limits: RequestLimits = DEFAULT_LIMITS) -> GenerateRequest:
    """Validate a /generate body; a RequestError names the first bad field or prompt index."""
    body = _check_keys(body, ("prompts", "n", "max_tokens", "temperature", "top_p"), ("seed",))
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError("prompts must be a non-empty list of token-id lists")
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"prompts has {len(prompts)} prompts; this server takes at most {limits.max_prompts} "
                           "per request", 413)
    for i, p in enumerate(prompts):
        _check_ids(p, f"prompts[{i}]", max_model_len, vocab_size)
    n, max_tokens, temperature, top_p = body["n"], body["max_tokens"], body["temperature"], body["top_p"]
    seed = body.get("seed")
    if not is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise RequestError(f"n must be an integer in [1, {MAX_SAMPLES}], got {n!r}")
    if len(prompts) * n > limits.max_samples:
        raise RequestError(f"{len(prompts)} prompts x n {n} = {len(prompts) * n} samples; this server takes at most "
                           f"{limits.max_samples} per request", 413)
    if not is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not _is_number(temperature) or temperature < 0:
        raise RequestError(f"temperature must be a number >= 0, got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and not is_int(seed):
        raise RequestError(f"seed must be an integer or null, got {seed!r}")
    return GenerateRequest(prompts, n, max_tokens, float(temperature), float(top_p), seed)


def parse_probe(body: Any, max_model_len: int, vocab_size: int) -> list[int]:
    body = _check_keys(body, ("token_ids",))
    return _check_ids(body["token_ids"], "token_ids", max_model_len, vocab_size, min_len=2)


def parse_update(body: Any) -> tuple[int, str]:
    body = _check_keys(body, ("step", "path"))
    step, path = body["step"], body["path"]
    if not is_int(step) or step < 0:
        raise RequestError(f"step must be an integer >= 0, got {step!r}")
    if not isinstance(path, str) or not path:
        raise RequestError(f"path must be a non-empty string, got {path!r}")
    return step, path


# --------------------------------------------------------------------------- the application


def add_logprob_noise(results: list[list[dict]], std: float, seed: int) -> None:
    """Gaussian noise of ``std`` on every returned log-prob, seeded (fault tests: the mismatch
    between a sampler's kernels and the trainer's, made visible on CPU)."""
    import random

    rng = random.Random(seed)
    for per_prompt in results:
        for sample in per_prompt:
            sample["logprobs"] = [min(0.0, lp + rng.gauss(0.0, std)) for lp in sample["logprobs"]]


class InferenceServer:
    """The endpoints, independent of HTTP: each takes the parsed JSON body, returns a dict."""

    def __init__(self, name: str, store: RunStore, backend: Backend, weight_step: int, model: str, dtype: str,
                 limits: RequestLimits = DEFAULT_LIMITS):
        self.name, self.store, self.backend = name, store, backend
        self.weight_step = weight_step
        self.model, self.dtype = model, dtype
        self.limits = limits
        self.lock = threading.Lock()  # one backend operation at a time (drains for updates)
        self.parses = threading.BoundedSemaphore(MAX_PARSES)
        self.token = os.environ.get(TOKEN_ENV) or None
        self.address = ""  # host:port as announced (set once bound): /hello's proof names it
        self.dead = threading.Event()  # set when the engine died: main() stops with exit 1

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        return header is not None and hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())

    def hello(self, body: Any) -> dict:
        """Prove this server holds the token, for this address, without sending it."""
        nonce = _check_keys(body, ("nonce",))["nonce"]
        if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
            raise RequestError("nonce must be a string of 16-128 characters")
        return {"proof": hello_proof(self.token, nonce, self.address) if self.token else None, "name": self.name}

    def health(self, _body: Any = None) -> dict:
        return {"status": "ok", "weight_step": self.weight_step, "backend": self.backend.name,
                "model": self.model, "dtype": self.dtype, "name": self.name}

    def generate(self, body: Any) -> dict:
        req = parse_generate(body, self.backend.max_model_len, self.backend.vocab_size, self.limits)
        with self.lock:
            start = time.perf_counter()
            results = self.backend.generate(req)
            slow = faults.armed("server.slow_generate")
            if slow is not None:  # tests only: a long generation (minutes at 24k tokens), holding the lock
                time.sleep(float(slow))
            step = self.weight_step
        seconds = time.perf_counter() - start
        noise = faults.armed("server.logprob_noise")
        if noise is not None:  # tests only: a sampler whose kernels disagree with the trainer's
            add_logprob_noise(results, float(noise), request_seed(req.seed))
        tokens = sum(len(s["token_ids"]) for per_prompt in results for s in per_prompt)
        log.info("generate: %d prompts x %d samples, %d tokens in %.2f s (%.0f tok/s), weights step %d",
                 len(req.prompts), req.n, tokens, seconds, tokens / max(seconds, 1e-9), step)
        return {"weight_step": step, "results": results}

    def probe(self, body: Any) -> dict:
        ids = parse_probe(body, self.backend.max_model_len, self.backend.vocab_size)
        with self.lock:
            return {"weight_step": self.weight_step, "logprobs": self.backend.probe(ids)}

    def update_weights(self, body: Any) -> dict:
        step, path = parse_update(body)
        expected = self.store.step_path("weights", step)
        if os.path.realpath(path) != os.path.realpath(expected):
            raise RequestError(f"path {path} is not weights/step_{step} of this run ({expected})")
        with self.lock:
            start = time.perf_counter()
            try:
                self.store.step_dir("weights", step)  # says "no STABLE marker" or "does not exist"
                # The lease keeps retention from deleting the folder while it is read.
                with self.store.lease("weights", step, holder=self.name) as folder:
                    report = self.backend.update(folder, step)
            except StepNotFound as e:
                raise RequestError(str(e), status=409) from None
            except BaseException:
                self.weight_step = UNKNOWN_STEP
                raise
            self.weight_step, self.model = step, str(expected)
        seconds = time.perf_counter() - start
        log.info("loaded weights step %d by %s in %.2f s (prefix cache reset: %s)",
                 step, report["method"], seconds, report["prefix_cache_reset"])
        return {"weight_step": step, "seconds": round(seconds, 4), "method": report["method"],
                "prefix_cache_reset": report["prefix_cache_reset"]}


# --------------------------------------------------------------------------- HTTP


ROUTES = {("GET", "/health"): "health", ("POST", "/generate"): "generate", ("POST", "/hello"): "hello",
          ("POST", "/probe"): "probe", ("POST", "/update_weights"): "update_weights"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "deepscaler-inference"
    protocol_version = "HTTP/1.1"  # keep-alive: the orchestrator reuses one connection

    def setup(self) -> None:
        # Anyone who reaches the port can open a connection before the token is checked: each
        # read or write waits at most inference.socket_timeout_s (our clients send at once).
        self.timeout = self.server.socket_timeout_s  # type: ignore[attr-defined]
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app: InferenceServer = self.server.app  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        try:
            hello = (method, path) == ("POST", "/hello")
            if not hello and not app.authorized(self.headers.get("Authorization")):
                self.close_connection = True  # the body (if any) stays unread
                raise RequestError(f"missing or wrong bearer token (set {TOKEN_ENV} for the client)", 401)
            route = ROUTES.get((method, path))
            if route is None:
                known = any(p == path for _, p in ROUTES)
                self.close_connection = True
                raise RequestError(f"{method} {path}: {'wrong method' if known else 'no such endpoint'}",
                                   405 if known else 404)
            if hello:  # small, and must not wait behind the requests in flight
                result = app.hello(self._read_json(HELLO_MAX_BYTES))
            elif method == "POST":
                # At most MAX_PARSES bodies in memory, each from reading to the response; the
                # backend lock then takes one request at a time.
                with app.parses:
                    result = getattr(app, route)(self._read_json(app.limits.max_body_bytes))
            else:
                result = getattr(app, route)(None)
        except RequestError as e:
            self._send(e.status, {"error": str(e)})
        except BackendDead as e:
            log.error("the engine died: %s", e)
            self._send(503, {"error": f"server {app.name}: the engine died: {one_line(e)}"})
            app.dead.set()
        except Exception as e:  # a bug or an engine error: report it, keep serving
            log.exception("%s %s failed", method, path)
            self._send(500, {"error": f"{type(e).__name__}: {one_line(e)}"})
        else:
            self._send(200, result)

    def _read_json(self, limit: int) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError("a JSON body with a Content-Length header is required", 411)
        if int(length) > limit:
            self.close_connection = True  # refused before reading it
            raise RequestError(f"request body of {length} bytes is over this server's {limit} byte limit "
                               "(from its max model length and the batch a request may hold)", 413)
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            self.close_connection = True
            raise RequestError(f"the request body ended after {len(raw)} of {length} bytes")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({one_line(e)})") from None
        except RecursionError:
            raise RequestError("the request body is nested too deeply") from None

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.warning("client went away before the %d response to %s was sent", status, self.path)

    def log_message(self, fmt: str, *args: Any) -> None:
        # One line per request (never headers: they carry the token); health polls at debug.
        level = logging.DEBUG if self.path == "/health" else logging.INFO
        log.log(level, "%s %s", self.address_string(), fmt % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a request in flight must not keep a stopping server alive
    allow_reuse_address = True

    def __init__(self, address, handler, socket_timeout_s: float, max_connections: int):
        super().__init__(address, handler)
        self.socket_timeout_s = socket_timeout_s
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        """A thread per connection, up to ``max_connections`` (inference.max_connections: a
        thread each, however slow their senders); beyond that 503 and close."""
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


# --------------------------------------------------------------------------- start-up


def resolve_start(store: RunStore, spec: str) -> int:
    """``--weights-step N|latest|base`` -> a stable weights step that verifies (sizes and
    checksums: ``weights_format.check_weights_step``), or BASE_STEP. ``latest`` passes over a
    damaged step with a warning; a damaged step N is a one-line StepCorrupt naming the file."""
    from deepscaler.weights_format import check_weights_step, newest_intact_weights

    if spec == "base":
        return BASE_STEP
    if spec == "latest":
        latest = newest_intact_weights(store, log.warning)
        return BASE_STEP if latest is None else latest
    try:
        step = int(spec)
    except ValueError:
        raise ConfigError(f"--weights-step '{spec}': expected a step number, 'latest' or 'base'") from None
    check_weights_step(store, step)  # StepNotFound lists the stable steps; StepCorrupt names the damaged file
    return step


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def auth_refusal(has_token: bool, no_auth: bool, bind: str) -> str | None:
    """Why a server must not start (None: it may). Anyone who reaches a node's ports could use
    a server without a token, so only ``--no-auth`` on a loopback address goes without."""
    if has_token:
        return None
    if not no_auth:
        return (f"{TOKEN_ENV} is not set: the server will not serve without a token (the launchers set it; "
                "by hand, set it, or pass --no-auth with --host 127.0.0.1)")
    if not is_loopback(bind):
        return f"--no-auth serves anyone who reaches {bind}: it is allowed on a loopback --host only (127.0.0.1)"
    return None


def default_host() -> str:
    """127.0.0.1 outside Slurm; inside a job, this node's address as other nodes reach it."""
    if not os.environ.get("SLURM_JOB_ID"):
        return "127.0.0.1"
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = "127.0.0.1"
    if ip.startswith("127."):  # Debian maps the hostname to 127.0.1.1: ask the routing table
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 1))  # UDP connect sends nothing
                ip = s.getsockname()[0]
            except OSError:
                pass
    return ip


def make_backend(cfg: Config, source: str, revision: str | None) -> Backend:
    if cfg.inference.backend == "hf":
        from deepscaler.inference.hf import HFBackend

        return HFBackend(source, cfg.model.dtype, max_model_len(cfg), revision=revision)
    from deepscaler.inference.vllm_backend import VllmBackend

    return VllmBackend(cfg, source, revision=revision)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("python -m deepscaler.inference", __doc__)
    parser.add_argument("--name", required=True,
                        help="server name: servers/<name>.addr; '{rank}' is replaced by SLURM_PROCID "
                             "(one srun step starts every server of a Slurm job)")
    parser.add_argument("--host", help="address to bind and announce (default: 127.0.0.1, or this node's IP in Slurm)")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (the default)")
    parser.add_argument("--weights-step", default="latest", help="N, latest (default) or base")
    parser.add_argument("--no-auth", action="store_true",
                        help=f"serve without {TOKEN_ENV} (by hand, on a loopback --host only)")
    args = parse_command_line(parser, argv)
    args.name = args.name.replace("{rank}", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    bind = args.host or default_host()
    refusal = auth_refusal(bool(os.environ.get(TOKEN_ENV)), args.no_auth, bind)
    if refusal:
        log.error("error: %s", refusal)
        return 2
    backend = None
    try:
        cfg = load_config_args(args.config, args.overrides)
        apply_process_settings(cfg)
        cuda_preflight.require()  # a driver too old for torch's CUDA: one line, before any engine starts
        store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
        store.remove_server_address(args.name)  # a stale file of a killed predecessor misleads waiters
        step = resolve_start(store, args.weights_step)
        # handover/<name>.json beats from here on (never closed: the process ends in os._exit), so
        # that the orchestrator tells a frozen start-up from a slow one (wait_for_servers).
        Reporter(store, args.name, step, heartbeat_s=min(HEARTBEAT_S, cfg.inference.liveness_timeout_s / 4),
                 active=ATTEMPT_ENV in os.environ).__enter__()
        start = time.perf_counter()
        if step == BASE_STEP:
            from deepscaler.hf_loading import model_source

            source = model_source(cfg)
            # A Hub id resolves to its cache snapshot folder, which is that revision already.
            revision = None if os.path.isdir(source) else cfg.model.revision
            log.info("starting %s backend on the base model %s", cfg.inference.backend, source)
            backend = make_backend(cfg, source, revision)
        else:
            with store.lease("weights", step, holder=args.name) as folder:
                source, revision = str(folder), None
                log.info("starting %s backend on weights step %d (%s)", cfg.inference.backend, step, folder)
                backend = make_backend(cfg, source, revision)
        log.info("engine ready in %.1f s (max model length %d; %d usable CPU(s), GPUs %s)", time.perf_counter() - start,
                 backend.max_model_len, usable_cpus(), visible_gpus())
        limits = RequestLimits.of(cfg, backend.max_model_len, backend.vocab_size)
        app = InferenceServer(args.name, store, backend, step, source, cfg.model.dtype, limits)
        httpd = _HTTPServer((bind, args.port), _Handler, cfg.inference.socket_timeout_s,
                            cfg.inference.max_connections)
    except (ConfigError, StoreError, RequestError, OSError, ValueError) as e:
        log.error("error: %s", one_line(e))
        if backend is not None:
            backend.close()
        return 2
    except BackendDead as e:
        log.error("error: %s", one_line(e))
        return 1
    except BaseException:
        log.exception("start-up failed")
        if backend is not None:
            backend.close()
        return 1
    httpd.app = app  # type: ignore[attr-defined]
    host = default_host() if bind in ("0.0.0.0", "") else bind
    port = httpd.server_address[1]
    app.address = f"{host}:{port}"
    # Until here the default signal actions apply: a SIGTERM during a long engine start-up
    # ends the process at once (the vLLM engine process notices and follows).
    stop = threading.Event()
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: (received.append(signum), stop.set()))
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    store.write_server_address(args.name, host, port)
    log.info("serving on %s:%d (auth %s)", host, port, "on" if app.token else "off")

    # Started by a stage's supervisor: serve until its trainer has finished, then stop by
    # ourselves, cleanly (exit 0, address removed), so the servers' job step ends COMPLETED.
    attempt, trained = os.environ.get(ATTEMPT_ENV), False
    while not stop.wait(1.0):
        if app.dead.is_set():
            break
        if attempt is not None and handover.finished(store, "trainer", attempt):
            trained = True
            break
    code = 1 if app.dead.is_set() else 0
    log.info("stopping (%s)", f"signal {received[0]}" if received else "the trainer has finished" if trained
             else "the engine died")
    store.remove_server_address(args.name)
    httpd.shutdown()
    if not app.lock.acquire(timeout=STOP_GRACE_S):
        log.warning("a request was still running after %.0f s; stopping anyway", STOP_GRACE_S)
    backend.close()
    log.info("stopped (exit %d)", code)
    logging.shutdown()
    sys.stderr.flush()
    # os._exit: request threads may still sit in torch; interpreter teardown under them can crash.
    os._exit(code)
