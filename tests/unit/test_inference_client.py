"""The inference client's checks of what a server says.

A real server never sends a malformed answer, so these tests talk to a deliberately broken
one: a standard-library HTTP server that replies with canned bodies (the unreachable boundary
of "a server with a bug", named as such).

Where a stand-in plays a well-behaved server (a well-formed answer, a slow generation, a
frozen process: ``stoppable``), it is kept for speed, since a real server takes 15-20 s to
start; the real counterparts are tests/integration/test_inference_hf.py (the same client
against a real server: test_generate_shape_and_seeded_determinism,
test_wait_for_servers_reports_a_server_that_dies_at_start) and
tests/faults/test_hung_server.py::test_a_frozen_server_fails_the_stage_with_one_line_naming_it
(a real server frozen with SIGSTOP).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepscaler.inference.client import (Generation, InferenceClient, Sample, ServerError, ServerGone, log_tail,
                                         wait_for_servers)
from deepscaler.inference.contract import hello_proof
from deepscaler.store import RunStore


class BrokenServer:
    """Replies to every request with ``self.status`` and ``self.body``; records the requests."""

    def __init__(self):
        outer = self
        self.status, self.body, self.requests = 200, b"{}", []
        self.token = "secret"
        self.delay: dict[str, float] = {}  # path -> seconds before the reply (a long generation)

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                       json.loads(self.rfile.read(length)) if length else None))
                time.sleep(outer.delay.get(self.path, 0.0))
                body = outer.body
                if self.path == "/hello":  # it holds the clients' token: their check must pass
                    nonce = outer.requests[-1][3]["nonce"]
                    body = json.dumps({"proof": hello_proof(outer.token, nonce, outer.address)}).encode()
                self.send_response(200 if self.path == "/hello" else outer.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def reply(self, obj, status: int = 200) -> None:
        self.status = status
        self.body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()


@pytest.fixture
def broken():
    server = BrokenServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def sample(n_tokens: int = 2, **changes) -> dict:
    s = {"token_ids": list(range(n_tokens)), "logprobs": [-1.0] * n_tokens, "finish_reason": "length", "truncated": True}
    return {**s, **changes}


def test_generate_parses_a_well_formed_answer_and_sends_the_contract(broken):
    """Real counterpart: tests/integration/test_inference_hf.py::test_generate_shape_and_seeded_determinism."""
    broken.reply({"weight_step": 3, "results": [[sample(), sample(1, finish_reason="stop", truncated=False)]]})
    client = InferenceClient("server0", broken.address, token="secret")
    gen = client.generate([[5, 6]], n=2, max_tokens=4, temperature=0.6, top_p=1.0, seed=9)
    assert gen == Generation(3, [[Sample([0, 1], [-1.0, -1.0], "length", True), Sample([0], [-1.0], "stop", False)]])
    method, path, auth, body = broken.requests[-1]
    assert (method, path, auth) == ("POST", "/generate", "Bearer secret")
    assert body == {"prompts": [[5, 6]], "n": 2, "max_tokens": 4, "temperature": 0.6, "top_p": 1.0, "seed": 9}


@pytest.mark.parametrize("reply,message", [
    (b"not json", "returned invalid JSON"),
    ([1], "returned list, not a JSON object"),
    ({"results": [[sample(), sample()]]}, "'weight_step' missing or not an integer"),
    ({"weight_step": 1, "results": []}, r"'results' missing or not a list of 1 \(one per prompt\)"),
    ({"weight_step": 1, "results": [[sample()]]}, r"results\[0\] is not a list of 2 samples"),
    ({"weight_step": 1, "results": [[sample(), sample(logprobs=[-1.0])]]}, r"results\[0\]\[1\] is malformed"),
    ({"weight_step": 1, "results": [[sample(), sample(finish_reason="abort")]]}, r"results\[0\]\[1\] is malformed"),
    ({"weight_step": 1, "results": [[sample(), sample(token_ids=[0, "1"])]]}, r"results\[0\]\[1\] is malformed"),
])
def test_malformed_generate_answers_name_the_server(broken, reply, message):
    broken.reply(reply)
    with pytest.raises(ServerError, match=rf"^server s1 \(127\.0\.0\.1:\d+\): .*{message}"):
        InferenceClient("s1", broken.address).generate([[5, 6]], n=2, max_tokens=4, temperature=1.0, top_p=1.0)


def test_http_errors_carry_the_servers_one_line_message_and_status(broken):
    broken.reply({"error": "prompts[1] has 400 tokens"}, status=400)
    with pytest.raises(ServerError) as e:
        InferenceClient("s1", broken.address).probe([1, 2])
    assert e.value.status == 400
    assert str(e.value).endswith("POST /probe -> HTTP 400: prompts[1] has 400 tokens")


def test_probe_checks_the_number_of_log_probs(broken):
    broken.reply({"weight_step": 2, "logprobs": [-1.0, -2.0]})
    client = InferenceClient("s1", broken.address)
    assert client.probe([1, 2, 3]) == (2, [-1.0, -2.0])
    with pytest.raises(ServerError, match="'logprobs' missing or not a list of 3 log-probs"):
        client.probe([1, 2, 3, 4])


def test_an_unreachable_server_is_named():
    client = InferenceClient("gone", "127.0.0.1:9", timeout_s=5)  # the discard port: nothing listens
    with pytest.raises(ServerError, match=r"^server gone \(127\.0\.0\.1:9\): GET /health failed: .*refused"):
        client.health()


def test_the_token_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("DEEPSCALER_SERVER_TOKEN", "from-env")
    assert InferenceClient("a", "h:1").token == "from-env"
    assert InferenceClient("a", "h:1", token="given").token == "given"
    monkeypatch.delenv("DEEPSCALER_SERVER_TOKEN")
    assert InferenceClient("a", "h:1").token is None


def test_wait_for_servers_skips_an_impostor_then_finds_the_right_one(tmp_path, broken):
    """A stale address file may point at a live server of another name: it does not count."""
    store = RunStore(tmp_path, "run", 1)
    store.write_server_address("server0", *broken.address.split(":"))
    broken.reply({"status": "ok", "weight_step": 0, "name": "server7"})
    with pytest.raises(ServerError, match=r"not ready within 1 s \(announced .* answers as 'server7'"):
        wait_for_servers(store, ["server0"], timeout_s=1.0, poll_s=0.1)
    broken.reply({"status": "ok", "weight_step": 0, "name": "server0"})
    clients = wait_for_servers(store, ["server0"], timeout_s=60, poll_s=0.1)  # at once; 60 s ends only a bad wait
    assert clients["server0"].address == broken.address


def test_wait_for_servers_stops_when_the_process_exits(tmp_path):
    store = RunStore(tmp_path, "run", 1)
    store.logs_dir.mkdir(parents=True)
    with open(store.logs_dir / "server1.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; print('error: no GPU', file=sys.stderr); sys.exit(3)"],
                                stderr=log)
    start = time.monotonic()
    with pytest.raises(ServerError) as e:
        wait_for_servers(store, ["server1"], timeout_s=60, procs={"server1": proc}, poll_s=0.1)
    assert time.monotonic() - start < 30
    lines = str(e.value).splitlines()
    assert lines[0] == "server server1 exited with code 3 before it was ready"
    assert lines[-1] == "error: no GPU"


def test_log_tail_without_a_log(tmp_path):
    store = RunStore(tmp_path, "run", 1)
    assert log_tail(store, "server0") == f"(no log at {store.logs_dir / 'server0.log'})"


# --------------------------------------------------------------------------- liveness: alive is not done

# A server in a process of its own, to freeze with SIGSTOP: its kernel still completes TCP
# handshakes into the listen backlog, so a connect succeeds and the read hangs.
STOPPABLE = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "weight_step": 0, "name": sys.argv[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass

httpd = HTTPServer(("127.0.0.1", 0), Handler)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


@pytest.fixture
def stoppable():
    """(process, address) of a live server named server0; killed at the end (SIGKILL ends a stopped one too)."""
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, "server0"], stdout=subprocess.PIPE, text=True)
    try:
        yield proc, f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait()


def test_a_request_to_a_frozen_server_is_given_up_after_the_liveness_bound(stoppable, monkeypatch):
    """A stand-in server, frozen for real (SIGSTOP). Real counterpart:
    tests/faults/test_hung_server.py::test_a_frozen_server_fails_the_stage_with_one_line_naming_it."""
    monkeypatch.delenv("DEEPSCALER_SERVER_TOKEN", raising=False)
    proc, address = stoppable
    client = InferenceClient("server0", address, timeout_s=30, liveness_timeout_s=2)  # 30: a broken check fails, not hangs
    assert client.health()["name"] == "server0"
    os.kill(proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(ServerGone) as e:
        client.update_weights(3, "/run/weights/step_3")
    waited = time.monotonic() - start
    assert 2 <= waited < 6, f"gave up after {waited:.1f}s with a 2 s liveness bound"
    assert str(e.value).startswith(f"server server0 ({address}): POST /update_weights abandoned after ")
    assert "no answer to GET /health for 2 s" in str(e.value) and "\n" not in str(e.value)
    assert e.value.server == "server0"


def test_a_live_server_may_take_longer_than_the_liveness_bound(broken):
    """/health answers while /generate works: the request runs to its end (timeout_s), not to the liveness bound."""
    broken.reply({"weight_step": 3, "results": [[sample()]], "status": "ok"})
    broken.delay["/generate"] = 3.0
    client = InferenceClient("server0", broken.address, timeout_s=60, liveness_timeout_s=0.5)
    gen = client.generate([[5, 6]], n=1, max_tokens=4, temperature=1.0, top_p=1.0)
    assert gen.weight_step == 3
    asked = [path for _, path, _, _ in broken.requests]
    assert asked.count("/health") >= 3  # it did check, and the server was alive each time


def test_close_breaks_off_requests_in_flight_and_refuses_new_ones(broken):
    broken.delay["/generate"] = 60.0
    client = InferenceClient("server0", broken.address, timeout_s=3600)
    failed: list[BaseException] = []

    def generate():
        try:
            client.generate([[5, 6]], n=1, max_tokens=4, temperature=1.0, top_p=1.0)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            failed.append(e)

    worker = threading.Thread(target=generate)
    worker.start()
    deadline = time.monotonic() + 10
    while not any(path == "/generate" for _, path, _, _ in broken.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.close()
    worker.join(timeout=10)
    assert not worker.is_alive(), "close() did not break off the request in flight"
    assert isinstance(failed[0], ServerError) and "POST /generate broken off: the client was closed" in str(failed[0])
    with pytest.raises(ServerError, match="GET /health broken off"):
        client.health()


def test_wait_for_servers_fails_fast_on_a_server_that_announces_itself_then_freezes(tmp_path, stoppable):
    store = RunStore(tmp_path, "run", 1)
    proc, address = stoppable
    os.kill(proc.pid, signal.SIGSTOP)
    threading.Timer(0.5, lambda: store.write_server_address("server0", *address.split(":"))).start()
    start = time.monotonic()
    with pytest.raises(ServerGone) as e:
        wait_for_servers(store, ["server0"], timeout_s=600, poll_s=0.1, liveness_timeout_s=2)
    assert time.monotonic() - start < 30  # not startup_timeout_s
    assert str(e.value).splitlines()[0].startswith(f"server server0 announced {address} ")
    assert "but has not answered GET /health since" in str(e.value)


def test_wait_for_servers_gives_an_address_found_at_the_start_the_whole_startup_timeout(tmp_path, stoppable):
    """A file there before the wait may be a dead predecessor's, replaced once its successor is up."""
    store = RunStore(tmp_path, "run", 1)
    proc, address = stoppable
    os.kill(proc.pid, signal.SIGSTOP)
    store.write_server_address("server0", *address.split(":"))
    with pytest.raises(ServerError, match=r"^server server0 was not ready within 3 s \(announced") as e:
        wait_for_servers(store, ["server0"], timeout_s=3, poll_s=0.1, liveness_timeout_s=0.5)
    assert not isinstance(e.value, ServerGone)
    os.kill(proc.pid, signal.SIGCONT)  # the successor (here: the same server, awake) is found
    assert wait_for_servers(store, ["server0"], timeout_s=10, poll_s=0.1, liveness_timeout_s=0.5)["server0"].address == address


BEATING = """
import sys, time
from deepscaler.handover import Reporter
from deepscaler.store import RunStore
with Reporter(RunStore(sys.argv[1], "run", 1), "server0", -1, heartbeat_s=0.2):
    print("beating", flush=True)
    time.sleep(600)
"""


def test_wait_for_servers_fails_fast_on_a_server_whose_start_up_heartbeat_stopped(tmp_path, monkeypatch):
    """Before it announces an address, a server's handover/<name>.json beats: a slow start-up
    gets the whole startup timeout, a frozen one (SIGSTOP) fails after the liveness bound."""
    store = RunStore(tmp_path, "run", 1)
    monkeypatch.setenv("DEEPSCALER_ATTEMPT", "attempt-1")
    proc = subprocess.Popen([sys.executable, "-c", BEATING, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert proc.stdout.readline() == "beating\n"
        with pytest.raises(ServerError, match=r"^server server0 was not ready within 3 s \(no ") as e:
            wait_for_servers(store, ["server0"], timeout_s=3, poll_s=0.1, liveness_timeout_s=1)
        assert not isinstance(e.value, ServerGone)  # starting slowly, but alive
        os.kill(proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ServerGone) as e:
            wait_for_servers(store, ["server0"], timeout_s=600, poll_s=0.1, liveness_timeout_s=1)
        assert time.monotonic() - start < 30  # not startup_timeout_s
        assert re.match(rf"server server0 \(pid {proc.pid} on \S+\) has not reported for \d+ s while starting "
                        r"\(stopped, hung, or its node lost; inference\.liveness_timeout_s\)\n", str(e.value))
        monkeypatch.setenv("DEEPSCALER_ATTEMPT", "attempt-2")  # an earlier attempt's report is not this one's server
        with pytest.raises(ServerError, match=r"^server server0 was not ready within 2 s"):
            wait_for_servers(store, ["server0"], timeout_s=2, poll_s=0.1, liveness_timeout_s=1)
    finally:
        proc.kill()
        proc.wait()
