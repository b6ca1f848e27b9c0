"""The inference client's checks of what a server says.

A real server never sends a malformed answer, so these tests talk to a deliberately broken
one: a standard-library HTTP server that replies with canned bodies (the unreachable boundary
of "a server with a bug", named as such).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepscaler.inference.client import Generation, InferenceClient, Sample, ServerError, log_tail, wait_for_servers
from deepscaler.store import RunStore


class BrokenServer:
    """Replies to every request with ``self.status`` and ``self.body``; records the requests."""

    def __init__(self):
        outer = self
        self.status, self.body, self.requests = 200, b"{}", []

        class Handler(BaseHTTPRequestHandler):
            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                       json.loads(self.rfile.read(length)) if length else None))
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

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
    clients = wait_for_servers(store, ["server0"], timeout_s=5.0, poll_s=0.1)
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
