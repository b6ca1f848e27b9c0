"""The inference server with the transformers backend: real processes, real HTTP, tiny model."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from deepscaler.inference.client import InferenceClient, ServerError, WeightSyncError, sync_weights, wait_for_servers
from deepscaler.tiny import EOS, SPECIAL_TOKENS
from deepscaler.weights_format import compare_probe, read_probe
from tests.helpers.inference import PROMPTS, REPO, TOKEN, make_run, serve, start_server, stop, teacher_forced

pytestmark = pytest.mark.slow
EOS_ID = SPECIAL_TOKENS.index(EOS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def server(run):
    """One server for the module, started on weights step 0; tests set the step they need."""
    _cfg, store = run
    proc, client = serve(store, "server0", "--weights-step", "0")
    yield client
    stop(proc)


def post_raw(client: InferenceClient, path: str, data: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{client.address}{path}", data=data, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_names_the_server_and_its_weights(server, run):
    server.update_weights(0, run[1].step_path("weights", 0))
    h = server.health()
    assert h == {"status": "ok", "weight_step": 0, "backend": "hf", "dtype": "float32", "name": "server0",
                 "model": str(run[1].step_path("weights", 0))}


def test_generate_shape_and_seeded_determinism(server, run):
    server.update_weights(0, run[1].step_path("weights", 0))
    gen = server.generate(PROMPTS, n=3, max_tokens=12, temperature=1.0, top_p=1.0, seed=7)
    assert gen.weight_step == 0 and len(gen.samples) == len(PROMPTS)
    for group in gen.samples:
        assert len(group) == 3
        for s in group:
            assert len(s.token_ids) == len(s.logprobs) and 1 <= len(s.token_ids) <= 12
            assert all(lp <= 0 for lp in s.logprobs)
            assert (s.finish_reason, s.truncated) in (("stop", False), ("length", True))
    assert gen == server.generate(PROMPTS, n=3, max_tokens=12, temperature=1.0, top_p=1.0, seed=7)
    other = server.generate(PROMPTS, n=3, max_tokens=12, temperature=1.0, top_p=1.0, seed=8)
    assert other.samples != gen.samples
    # The samples of one prompt within a request differ (each has its own stream) ...
    assert len({tuple(s.token_ids) for s in gen.samples[0]}) == 3
    # ... and depend only on (seed, prompt index, sample index), not on the batch around them.
    alone = server.generate(PROMPTS[:1], n=2, max_tokens=12, temperature=1.0, top_p=1.0, seed=7)
    for a, b in zip(alone.samples[0], gen.samples[0]):  # same tokens; log-probs to float noise of padding
        assert a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 1.0)])
def test_logprobs_are_the_sampling_distribution(server, run, temperature, top_p):
    """Each log-prob equals a fresh model's log_softmax(logits / T) at that token: what the
    trainer computes for the importance ratio."""
    store = run[1]
    server.update_weights(1, store.step_path("weights", 1))
    gen = server.generate(PROMPTS, n=2, max_tokens=16, temperature=temperature, top_p=top_p, seed=3)
    for prompt, group in zip(PROMPTS, gen.samples):
        for s in group:
            expected = teacher_forced(store.step_path("weights", 1), prompt, s.token_ids, temperature)
            assert max(abs(a - b) for a, b in zip(s.logprobs, expected)) < 1e-4


def test_top_p_log_probs_are_renormalised_over_the_nucleus(server, run):
    """With top_p = 0.5 a sampled token's log-prob is its full log-prob minus log(nucleus mass),
    a mass between 0.5 and 1 (vLLM's processed_logprobs)."""
    store = run[1]
    server.update_weights(1, store.step_path("weights", 1))
    gen = server.generate(PROMPTS, n=2, max_tokens=8, temperature=0.8, top_p=0.5, seed=5)
    for prompt, group in zip(PROMPTS, gen.samples):
        for s in group:
            full = teacher_forced(store.step_path("weights", 1), prompt, s.token_ids, 0.8)
            for lp, lp_full in zip(s.logprobs, full):
                assert lp_full - 1e-4 <= lp <= lp_full + math.log(2) + 1e-4


def test_finish_reasons_stop_at_eos_and_length(server, run):
    store = run[1]
    server.update_weights(0, store.step_path("weights", 0))
    gen = server.generate(PROMPTS, n=2, max_tokens=5, temperature=1.0, top_p=1.0, seed=1)
    for group in gen.samples:
        for s in group:
            assert (len(s.token_ids), s.finish_reason, s.truncated) == (5, "length", True)
    server.update_weights(2, store.step_path("weights", 2))  # eos-loving after PROMPTS[0]
    for temperature in (1.0, 0.0):  # sampled and greedy
        gen = server.generate(PROMPTS[:1], n=2, max_tokens=5, temperature=temperature, top_p=1.0, seed=1)
        for s in gen.samples[0]:
            # eos ends the sample, is part of it, and has its log-prob (logit 200: log p ~ 0).
            assert (s.token_ids, s.finish_reason, s.truncated) == ([EOS_ID], "stop", False)
            assert -1e-3 < s.logprobs[0] <= 0


def test_weight_update_changes_outputs_and_passes_the_probe(server, run):
    store = run[1]
    server.update_weights(0, store.step_path("weights", 0))
    probe = read_probe(store.step_path("weights", 1))
    step, before = server.probe(probe["token_ids"])
    assert step == 0 and not compare_probe(probe["logprobs"], before, "float32")[0]
    report = sync_weights(server, store, 1)
    assert report["weight_step"] == 1 and report["method"] == "reload" and report["probe_max_diff"] < 1e-5
    step, after = server.probe(probe["token_ids"])
    assert step == 1 and after != before
    assert server.health()["weight_step"] == 1


def test_update_refuses_unstable_and_foreign_folders(server, run):
    store = run[1]
    server.update_weights(1, store.step_path("weights", 1))
    probe = read_probe(store.step_path("weights", 1))["token_ids"]
    before = server.probe(probe)
    assert before[0] == 1
    (store.weights_dir / "step_9").mkdir()  # no STABLE marker: unfinished or being deleted
    try:
        with pytest.raises(ServerError, match=r"HTTP 409: .*step_9 exists but has no STABLE marker") as e:
            server.update_weights(9, store.step_path("weights", 9))
        assert e.value.status == 409
    finally:
        (store.weights_dir / "step_9").rmdir()
    with pytest.raises(ServerError, match=r"HTTP 409: .*step_5 does not exist; stable weights steps: \[0, 1, 2\]"):
        server.update_weights(5, store.step_path("weights", 5))
    with pytest.raises(ServerError, match="HTTP 400: path .* is not weights/step_1 of this run"):
        server.update_weights(1, store.step_path("weights", 0))
    # Refused updates leave the weights alone: the same step, the same log-probs.
    assert server.health()["weight_step"] == 1
    assert server.probe(probe) == before


def test_requests_need_the_token(server):
    for token in (None, "wrong"):
        anonymous = InferenceClient("server0", server.address, timeout_s=10)
        anonymous.token = token  # None: no header, whatever the environment says
        anonymous.verified = True  # skip the client's own check (/hello): the server's is tested
        with pytest.raises(ServerError, match=r"server server0 \(127\.0\.0\.1:\d+\): GET /health -> HTTP 401") as e:
            anonymous.health()
        assert e.value.status == 401
        assert TOKEN not in str(e.value)


@pytest.mark.parametrize("body,field", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"prompts": [[3, 4]], "n": 1, "max_tokens": 4, "temperature": 1.0}).encode(), "missing field 'top_p'"),
    (json.dumps({"prompts": [[3, 4]], "n": 1, "max_tokens": 4, "temperature": 1.0, "top_p": 1, "sede": 1}).encode(),
     "unknown field 'sede'"),
    (json.dumps({"prompts": [[3, 4], []], "n": 1, "max_tokens": 4, "temperature": 1.0, "top_p": 1}).encode(),
     r"prompts\[1\] has 0 tokens"),
    (json.dumps({"prompts": [[3, 4], list(range(400))], "n": 1, "max_tokens": 4, "temperature": 1.0, "top_p": 1}).encode(),
     r"prompts\[1\] has 400 tokens; the server's max model length is 320"),
    (json.dumps({"prompts": [[3, 99999]], "n": 1, "max_tokens": 4, "temperature": 1.0, "top_p": 1}).encode(),
     r"prompts\[0\]\[1\] must be a token id in \[0, 4096\)"),
    (json.dumps({"prompts": [[3, 4]], "n": "2", "max_tokens": 4, "temperature": 1.0, "top_p": 1}).encode(), "n must be"),
])
def test_bad_requests_get_a_400_naming_the_field(server, body, field):
    status, reply = post_raw(server, "/generate", body)
    assert status == 400 and re.search(field, reply["error"]), reply
    assert "\n" not in reply["error"]


def test_a_partial_reload_is_caught_by_the_probe(run):
    """The fault hook makes the server skip the last layer yet report success: only the
    orchestrator-side probe check can see it. Then SIGTERM: exit 0, address removed."""
    store = run[1]
    proc, client = serve(store, "faulty", "--weights-step", "0", fault="inference.partial_reload@1")
    try:
        with pytest.raises(WeightSyncError, match=r"server faulty .* weights step 1: max \|Δlogprob\| = \d"):
            sync_weights(client, store, 1)
        assert client.health()["weight_step"] == 1  # the server believes it loaded step 1
        sync_weights(client, store, 2)  # no fault at step 2
    finally:
        code = stop(proc)
    assert code == 0
    assert "faulty" not in store.read_server_addresses()
    assert "stopped (exit 0)" in (store.logs_dir / "faulty.log").read_text()


def test_wait_for_servers_reports_a_server_that_dies_at_start(run):
    store = run[1]
    proc = start_server(store, "broken", "--weights-step", "base", "model.name=/nonexistent/model")
    start = time.monotonic()
    with pytest.raises(ServerError) as e:
        wait_for_servers(store, ["broken"], timeout_s=120, procs={"broken": proc})
    assert time.monotonic() - start < 60
    head, *tail = str(e.value).splitlines()
    assert head.startswith("server broken exited with code 2 before it was ready")
    assert "logs/broken.log" in tail[0] and "/nonexistent/model" in "\n".join(tail)


def test_wait_for_servers_times_out_with_the_log_tail(run):
    store = run[1]
    (store.logs_dir / "silent.log").write_text("".join(f"line {i}\n" for i in range(30)))
    start = time.monotonic()
    with pytest.raises(ServerError) as e:
        wait_for_servers(store, ["silent"], timeout_s=2.0)
    assert 2.0 <= time.monotonic() - start < 10
    lines = str(e.value).splitlines()
    assert lines[0].startswith("server silent was not ready within 2 s (no ") and "silent.addr" in lines[0]
    assert lines[-20:] == [f"line {i}" for i in range(10, 30)]


def test_sigint_also_stops_cleanly(run):
    store = run[1]
    proc, client = serve(store, "interrupted", "--weights-step", "latest")
    assert client.health()["weight_step"] == 2
    assert stop(proc, signal.SIGINT) == 0
    assert "interrupted" not in store.read_server_addresses()


def test_an_unknown_weights_step_fails_at_start(run):
    store = run[1]
    out = subprocess.run([sys.executable, "-m", "deepscaler.inference", "--config", str(store.run_yaml),
                          "--name", "nostep", "--weights-step", "7"],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "DEEPSCALER_SERVER_TOKEN": TOKEN})
    assert out.returncode == 2
    assert "weights/step_7 does not exist; stable weights steps: [0, 1, 2]" in out.stderr
