"""The memory and time planner (deepscaler/plan.py).

Its trace runs the trainer's own micro-batch on the meta device, following the CUDA path of
the varlen kernel (simulated boundary: the GPU; ``attention._on_cuda`` treats meta as CUDA).
Here the trace is held against an allocator-level measurement of the same code on the CPU
(torch.profiler's memory events), and the default stages against the 80 GiB of an H100.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from deepscaler import plan
from deepscaler.config import stage_config
from deepscaler.hf_loading import model_config

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def test_the_plan_command_ends_with_a_json_line_and_stage_1_fits():
    out = subprocess.run([sys.executable, "-m", "deepscaler.plan", "--stage", "1", "--json"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 10 < result["trainer_peak_gib"] < 80 and result["fits"]
    assert result["micro_batch"] == [9216, 9216, 9216, 5120]  # 32768 tokens of stage 1's longest sequences
    assert "traced on the meta device" in out.stdout and "GPU-hours" in out.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_the_default_stages_fit_80_gib(stage):
    p = plan.plan(stage_config(stage))
    assert p["fits"] and p["trainer_peak_gib"] < 80, p["trainer"]
    assert p["inference"]["concurrent_sequences"] > 0 and p["time"]["gpu_hours"] > 0


@pytest.mark.slurm
def test_stage_3_without_checkpointing_does_not_fit_and_submit_refuses_it(tmp_path, slurm_cluster, capsys):
    """Submitted to the real local Slurm (its sbatch, as on a login node): refused before any job."""
    off = "trainer.deepspeed.activation_checkpointing=false"
    p = plan.plan(stage_config(3, None, [off]))
    assert not p["fits"] and p["trainer_peak_gib"] > 80
    from deepscaler import submit

    code = submit.main(["--stage", "3", "--executor", "slurm", "--output-dir", str(tmp_path), off])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trainer.deepspeed.activation_checkpointing=true" in err
    assert "slurm.gpu_memory_gib (80)" in err and not (tmp_path / "deepscaler").exists()
    # --force goes past the planner (here to the next check: no Hub cache on this machine)
    code = submit.main(["--stage", "3", "--executor", "slurm", "--output-dir", str(tmp_path), off, "--force"])
    assert code == 2 and "Hub cache" in capsys.readouterr().err


def profiled_peak(fn) -> int:
    """The most bytes the CPU allocator held at once while ``fn`` ran (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_meta_trace_agrees_with_the_allocator_on_cpu(checkpointing):
    """A small shape whose activations are spread over layers, attention and the logits chunks."""
    overrides = ["model.tiny.hidden_size=256", "model.tiny.num_layers=6", "model.tiny.intermediate_size=1024",
                 "model.tiny.vocab_size=16384", "model.tiny.max_position_embeddings=4096",
                 "trainer.micro_batch_tokens=3072", "data.max_prompt_tokens=128", "sampling.max_response_tokens=896",
                 "trainer.logits_chunk_tokens=1024", f"trainer.deepspeed.activation_checkpointing={checkpointing}"]
    cfg = stage_config(1, "tiny-random", overrides)
    config = model_config(cfg)
    lengths = plan.row_lengths(cfg)
    assert lengths == [1024, 1024, 1024]
    traced = plan.trace_micro_batch(cfg, config, lengths, device="meta", dtype=torch.float32)
    torch.manual_seed(0)
    measured = profiled_peak(lambda: plan.trace_micro_batch(cfg, config, lengths, device="cpu", dtype=torch.float32))
    assert abs(traced["peak"] - measured) <= 0.10 * measured, (traced, measured)
    assert traced["peak"] - traced["weights"] > 0.5 * traced["weights"]  # the activations are what is measured


def test_a_tracker_counts_a_storage_once_and_frees_it():
    memory = plan.PeakMemory()
    with memory:
        a = torch.empty(1000, 1000, device="meta")  # 4 MB
        b = a * 2  # 4 MB more
        del a
        view = b.view(-1)  # no new storage
        c = torch.empty(500, 1000, device="meta")  # 2 MB
    assert (memory.peak, memory.live) == (8_000_000, 6_000_000)
    del b, view, c
    assert memory.live == 0


def test_a_cpu_preset_has_nothing_to_plan():
    from deepscaler.submit import plan_gpu_stages

    assert plan_gpu_stages([stage_config(1, "tiny-random")]) == {}


# --------------------------------------------------------------------------- layouts (issue 21)


@pytest.fixture(scope="module")
def stage_1_plan():
    return plan.plan(stage_config(1))


def layout(p, name):
    return next(lay for lay in p["layouts"] if lay["name"] == name)


def test_stage_1_chooses_a_layout_at_most_55_percent_of_the_split_gpu_hours(stage_1_plan):
    """The components' 4+4 split, synchronous, idles half its GPUs; the chosen layout does not."""
    p = stage_1_plan
    split = layout(p, p["components_split"])
    assert split["name"] == "split 4+4" and split["busy_fraction"] < 0.55
    assert p["configured"] == "shared" and layout(p, "shared")["gpu_hours"] == p["time"]["gpu_hours"]
    chosen = layout(p, p["chosen"])
    assert chosen["fits"] and chosen["gpus"] == 8
    assert chosen["gpu_hours"] <= 0.55 * split["gpu_hours"] and chosen["busy_fraction"] >= 0.85
    assert min(lay["gpu_hours"] for lay in p["layouts"] if lay["fits"]) == chosen["gpu_hours"]
    # every split of 8 GPUs, and the shared one
    assert sorted(lay["name"] for lay in p["layouts"]) == sorted(["shared", *(f"split {s}+{8 - s}" for s in range(1, 8))])
    for lay in p["layouts"]:
        assert set(lay) >= {"name", "gpus", "step_s", "busy_fraction", "gpu_hours", "fits", "why"}
        assert 0 < lay["busy_fraction"] <= 1 and (lay["why"] is None) == lay["fits"]
    assert p["chosen"] in p["choice"] and "the configured shared" in p["choice"]


def test_async_splits_overlap_their_phases():
    """At async_level 1 a split's step is the longer phase plus the weights, not their sum."""
    p = plan.plan(stage_config(1, None, ["orchestrator.async_level=1"]))
    sync = p["time"]["weights_sync_s"]
    four = layout(p, "split 4+4")
    assert four["step_s"] == pytest.approx(max(four["sample_s"], four["train_s"]) + sync, abs=0.2)
    assert four["busy"]["inference"] == pytest.approx(1.0 - sync / four["step_s"], abs=0.01)
    assert layout(p, "split 6+2")["step_s"] < four["step_s"]  # sampling is the longer phase


def test_the_shared_layout_memory_of_the_1_5b_shape_fits_80_gib(stage_1_plan):
    """Per GPU: a trainer rank of 8 (ZeRO partitions over 8), a server's weights, the KV cache of
    its 128 of the step's 1024 sequences at 9216 tokens, vLLM's overhead and the margin."""
    shared = layout(stage_1_plan, "shared")
    m = shared["memory_gib"]
    assert m["sequences_per_server"] == 128
    assert m["kv_cache"] == pytest.approx(128 * 9216 * 28672 / GIB, abs=0.01)  # 28 KiB per token
    assert m["trainer"] < layout(stage_1_plan, "split 4+4")["trainer_gib"]  # the optimizer is split 8 ways, not 4
    parts = m["trainer"] + m["server_weights"] + m["kv_cache"] + m["overhead"] + m["margin"]
    assert m["total"] == pytest.approx(parts, abs=0.02) and m["total"] <= 80 and shared["fits"]
    util = shared["gpu_memory_utilization"]
    assert (m["server_weights"] + m["kv_cache"] + m["overhead"]) / 80 <= util < 1 - (m["trainer"] + m["margin"]) / 80


def test_a_shared_layout_that_does_not_fit_is_refused_naming_the_keys():
    big = plan.plan(stage_config(1, None, ["orchestrator.prompts_per_step=512"]))
    shared = layout(big, "shared")
    assert not shared["fits"] and shared["memory_gib"]["total"] > 80
    assert "\n" not in shared["why"] and "orchestrator.prompts_per_step" in shared["why"]
    assert "sampling.max_response_tokens" in shared["why"] and "gpus_per_node" in shared["why"]
    assert big["chosen"] != "shared" and layout(big, big["chosen"])["fits"]


def test_the_shared_layout_fits_exactly_up_to_the_gpu_memory(stage_1_plan):
    """The boundary: the same shape on a GPU just above, then just below, the total it needs."""
    total = layout(stage_1_plan, "shared")["memory_gib"]["total"]
    above = plan.plan(stage_config(1, None, [f"slurm.gpu_memory_gib={total + 0.02}"]))
    below = plan.plan(stage_config(1, None, [f"slurm.gpu_memory_gib={total - 0.02}"]))
    assert layout(above, "shared")["fits"] and above["chosen"] == "shared"
    assert not layout(below, "shared")["fits"] and below["chosen"] != "shared"


def test_the_table_lists_the_layouts_and_the_choice(stage_1_plan):
    text = plan.table(stage_1_plan)
    assert "shared (configured)" in text and "split 4+4 " in text and "gpu_memory_utilization" in text
    assert stage_1_plan["choice"] in text


def test_the_layout_table_of_docs_cluster_is_current():
    committed = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    begin, end = committed.index(plan.DOC_BEGIN), committed.index(plan.DOC_END) + len(plan.DOC_END)
    assert committed[begin:end] == plan.layouts_doc(), (
        f"docs/cluster.md's layout table is stale; regenerate it with: {plan.DOC_REGENERATE}")
