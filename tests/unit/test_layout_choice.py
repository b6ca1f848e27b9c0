"""The layout a stage's jobs run (issue 21): ``slurm.layout`` resolved by the planner at submit
(``deepscaler.plan.resolve_layout``), only layouts the jobs can run, and what submit prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepscaler import plan, submit
from deepscaler.config import ConfigError, stage_config

REPO = Path(__file__).resolve().parents[2]


def planned(stage: int, *overrides: str):
    cfg = stage_config(stage, None, list(overrides))
    return cfg, plan.plan(cfg)


def test_stage_1_on_auto_runs_shared_at_most_55_percent_of_the_split_gpu_hours():
    cfg, p = planned(1, "slurm.layout=auto")
    resolved, line = plan.resolve_layout(cfg, p)
    shared, split = plan.named(p, "shared"), plan.named(p, "split 4+4")
    assert p["configured"] == "split 4+4" and split["configured"]  # auto: the components' split until resolved
    assert resolved.slurm.layout == "shared" and plan.layout_name(resolved) == p["chosen"] == "shared"
    assert shared["gpu_hours"] <= 0.55 * split["gpu_hours"] and shared["busy_fraction"] >= 0.85
    util = shared["gpu_memory_utilization"]
    assert resolved.inference.gpu_memory_utilization == util != cfg.inference.gpu_memory_utilization
    assert 0.3 < util < 0.7 and f"inference.gpu_memory_utilization {util:.2f}" in line
    assert "\n" not in line and line.startswith("stage 1: shared:") and "slurm.layout auto" in line
    assert (resolved.slurm.inference, resolved.slurm.trainer) == (cfg.slurm.inference, cfg.slurm.trainer)


def test_the_stage_files_run_shared_and_their_comments_carry_the_planner_numbers():
    for stage in (1, 2, 3):
        cfg, p = planned(stage)
        assert cfg.slurm.layout == "shared" and cfg.orchestrator.async_level == 0
        assert p["configured"] == p["chosen"] == "shared" and p["fits"]
        split = plan.named(p, p["components_split"])
        line = next(ln for ln in (REPO / f"yaml/stage{stage}.yaml").read_text().splitlines()
                    if ln.strip().startswith("layout:"))
        assert (f"# ours: shared {plan.named(p, 'shared')['gpu_hours']:.0f} vs {split['name']} "
                f"{split['gpu_hours']:.0f} GPU-hours") in line, line
        resolved, _ = plan.resolve_layout(cfg, p)
        assert resolved.inference.gpu_memory_utilization == plan.named(p, "shared")["gpu_memory_utilization"]


def test_a_pool_of_several_nodes_offers_whole_node_splits_only():
    """4 nodes x 8 GPUs: a split that is not whole nodes per side would put servers and trainer
    ranks on one node, which a heterogeneous job cannot."""
    cfg, p = planned(2, "slurm.layout=auto")
    assert p["pool"] == (4, 8)
    assert [lay["name"] for lay in p["layouts"]] == ["shared", "split 8+24", "split 16+16", "split 24+8"]
    one = planned(1, "slurm.layout=auto")[1]  # one node: any split
    assert [lay["name"] for lay in one["layouts"]][1:] == [f"split {s}+{8 - s}" for s in range(1, 8)]


@pytest.mark.parametrize("stage, shapes", [
    (2, ((3, 8), (1, 8))),  # several nodes: whole nodes of 8 per side
    (1, ((1, 6), (1, 2))),  # one node: GPUs per side
])
def test_auto_reshapes_the_components_to_the_chosen_split(stage, shapes):
    """Where shared does not fit (a 40 GiB GPU) and the phases overlap (async_level 1), the
    split that feeds the slower sampling wins, and the jobs get its shape."""
    cfg, p = planned(stage, "slurm.layout=auto", "slurm.gpu_memory_gib=40", "orchestrator.async_level=1")
    assert not plan.named(p, "shared")["fits"]
    resolved, line = plan.resolve_layout(cfg, p)
    inf, tr = resolved.slurm.inference, resolved.slurm.trainer
    assert resolved.slurm.layout == "split" and ((inf.nodes, inf.gpus_per_node), (tr.nodes, tr.gpus_per_node)) == shapes
    assert plan.layout_name(resolved) == p["chosen"] and p["chosen"] in line
    assert resolved.inference.gpu_memory_utilization == cfg.inference.gpu_memory_utilization


def test_components_that_do_not_pool_run_their_own_split_only():
    cfg, p = planned(1, "slurm.layout=auto", "slurm.inference.gpus_per_node=8")  # 8 + 4 GPUs: not one node
    assert p["pool"] is None and [lay["name"] for lay in p["layouts"]] == ["shared", "split 8+4"]
    shared = plan.named(p, "shared")
    assert not shared["fits"] and "do not pool into whole nodes" in shared["why"]
    resolved, _ = plan.resolve_layout(cfg, p)
    assert resolved.slurm.layout == "split" and resolved.slurm.inference == cfg.slurm.inference
    with pytest.raises(ConfigError, match="slurm.layout"):  # and shared is refused when asked for
        stage_config(1, None, ["slurm.layout=shared", "slurm.inference.gpus_per_node=8"])


def test_explicit_shared_that_does_not_fit_is_refused_naming_the_keys_and_a_nearby_shape_is_accepted():
    cfg, p = planned(1, "slurm.layout=shared", "orchestrator.prompts_per_step=256")
    resolved, line = plan.resolve_layout(cfg, p)
    assert resolved.slurm.layout == "shared" and "DOES NOT FIT" in line and "\n" not in line
    why = plan.refusal(p, plan.layout_name(resolved))
    assert why.startswith("stage 1: shared: a GPU needs") and why.endswith("--force submits anyway")
    for key in ("orchestrator.prompts_per_step", "sampling.max_response_tokens", "slurm.gpu_memory_gib"):
        assert key in why
    assert p["chosen"] != "shared"  # explicit: not replaced by the split that fits
    cfg, p = planned(1, "slurm.layout=shared", "orchestrator.prompts_per_step=192")  # 96 GiB -> 76
    resolved, line = plan.resolve_layout(cfg, p)
    assert plan.refusal(p, "shared") is None and "DOES NOT FIT" not in line
    assert resolved.inference.gpu_memory_utilization == plan.named(p, "shared")["gpu_memory_utilization"]


def test_explicit_split_is_unchanged_and_warned_about():
    cfg, p = planned(1, "slurm.layout=split")
    resolved, line = plan.resolve_layout(cfg, p)
    assert resolved is cfg and line.startswith("stage 1: split 4+4:") and "slurm.layout split" in line
    warning = plan.busy_warning(p, "split 4+4")
    assert "idle 51%" in warning and "slurm.layout=shared" in warning and "\n" not in warning
    assert plan.busy_warning(p, "shared") is None
    # auto's own choice can idle too: then nothing better is named
    crowded = planned(1, "slurm.layout=auto", "orchestrator.prompts_per_step=512")[1]
    assert crowded["chosen"].startswith("split")
    assert plan.busy_warning(crowded, crowded["chosen"]).endswith("no layout that fits does better")


def test_a_cpu_stage_is_left_as_it_is():
    cfg = stage_config(1, "tiny-random", ["slurm.layout=auto"])
    resolved, line = plan.resolve_layout(cfg)
    assert resolved is cfg and line == "stage 1: split (no GPUs to share)"
    assert submit.plan_gpu_stages([cfg]) == {} and submit.resolve_layouts([cfg], {}) == ([cfg], {})


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = submit.main(["--stage", "1", "--executor", "local", "--dry-run", "--output-dir", "/nonexistent/x", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_dry_run_prints_the_layout_and_the_config_the_jobs_run(capsys):
    code, out, err = dry_run(capsys)
    assert code == 0 and "warning: stage" not in err
    lines = [ln for ln in out.splitlines() if ln.startswith("# layout:")]
    assert len(lines) == 1 and lines[0].startswith("# layout: stage 1: shared: 8 GPUs")
    assert "8 vllm server(s) and 8 trainer rank(s) sharing 1 node(s) x 8 GPU(s)" in out
    assert "  layout: shared\n" in out and "  gpu_memory_utilization: 0.47\n" in out  # run.yaml's


def test_submit_warns_when_the_layout_idles_below_70_percent(capsys):
    code, out, err = dry_run(capsys, "slurm.layout=split")
    assert code == 0 and "# layout: stage 1: split 4+4" in out
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "busy 49%" in warnings[0] and "slurm.layout=shared" in warnings[0]


def test_submit_of_a_cpu_stage_prints_no_layout(capsys):
    code, out, err = dry_run(capsys, "--preset", "tiny-random")
    assert code == 0 and "# layout:" not in out and err == ""
