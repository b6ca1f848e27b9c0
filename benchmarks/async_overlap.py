"""Does ``orchestrator.async_level=1`` overlap generation with training?

    .venv/bin/python -m benchmarks.async_overlap [--dir DIR] [--steps 14] [--skip 3] [--rounds 1] [--keep]

What it measures: two runs of the real tiny stage (``python -m deepscaler.submit --stage 1
--preset tiny-random --executor local``: hf inference server, DeepSpeed trainer, orchestrator as
separate processes), identical except for ``orchestrator.async_level`` = 0 (on-policy: the
orchestrator samples step N only with weights N, so generation and training alternate) and
= 1 (it samples step N with weights N-1 while the trainer trains on step N-1's rollouts).

How:

- Workload: the tiny preset's untrained model (hidden 128, 2 layers, vocab 4096; it rarely
  emits eos, so nearly every response runs to ``--max-tokens`` and every step has about the
  same size) on a seeded file of short prompts ("What is 23 + 48?", 31 tokens rendered).
  Defaults: 4 prompts x 4 samples x 512 tokens per step. Sized so that generation and
  training take similar time on this machine (measured: ~3-4 s vs ~4-5 s on their own), and
  long enough that the hand-off polling (below) is not most of a step: 16 rows keep the
  hf server's per-token overhead (one Python loop per decode step) comparable to the trainer's
  per-token cost, where 64 rows x 64 tokens made training 3x longer than generation.
  No KL term (no reference forward), checkpoints only at the end.
- Threads: every process gets ``OMP_NUM_THREADS=1`` (``--threads``), so on a 2-core machine
  the server and the trainer each have a core and can actually run at the same time.
- Per orchestrator step N, from ``metrics.jsonl``, paired with trainer step N (the one that
  trained on rollouts N-1 and published weights N: in the sync run the orchestrator waits for
  exactly that training before sampling N; in the async run it runs while N is sampled):
    generation busy  G = orchestrator ``time_sample_s + time_score_s`` (requests to the server
                         and scoring; the wait for weights and loading them into the server is
                         ``time_weights_s``, shown apart: the load itself is under 0.1 s here)
    training busy    T = trainer ``time_step_s - time_wait_s`` (the update, publishing
                         weights/step_N with its probe, retention; the wait for rollouts is idle)
    step time        P = orchestrator ``time_step_s`` (its loop period, waits included; the
                         trainer's ``time_step_s`` is shown too and agrees on average)
  Busy fractions = sum G / sum P and sum T / sum P over the steady steps (the share of the
  window's wall time each side worked). Efficiency (async run) = max of the two busy
  fractions = max(G, T) / P with G, T and P of that same run: 1.0 means a step takes only as
  long as its slower side, i.e. perfect overlap (target >= 0.85). Ratios of sums, because a
  neighbour's burst stretches work and step alike, and orchestrator and trainer steps are not
  exactly simultaneous (the per-step ``eff`` column scatters around the sum ratio).
  ``efficiency_vs_sync_work`` = max(G, T) of the sync run / P of the async run: the same
  against the work measured when the two sides do not run at once, so it also charges the
  slowdown of sharing the machine (two cores, other people's jobs).
  Speed-up = P(sync) / P(async) with medians of the per-step P (they come from two runs at
  different times; a burst in one run moves the median less than the mean, kept as
  ``*_mean``). Its ideal is 1 / max busy fraction of the sync run.
- Steady state: the first ``--skip`` steps (server and trainer warm-up, first weight load)
  and the last step (final checkpoint) are left out. ``--rounds N`` interleaves N sync/async
  pairs and pools their steady steps, for less noise at N times the cost (~4.5 min a pair).
- Hand-offs go through the filesystem: ``RunStore.wait_for_step`` checks, then sleeps a
  tenth of the time waited so far (20 ms to 1 s), so a hand-off is noticed up to ~10% late.
  The synchronous loop pays two such waits per step (rollouts -> trainer, weights ->
  orchestrator), ``sync_handoff_s`` = mean P - G - T of the sync run; the async loop hides them
  as long as the faster side plus its poll fits inside the slower side.

The machine is shared (2 cores); the load average before and after is printed and in the JSON.

The last line is one JSON object:
    {"efficiency", "efficiency_vs_sync_work", "speedup", "ideal_speedup", "async_faster",
     "target_met", "sync_step_s", "async_step_s", "sync_handoff_s", "sync": {...}, "async": {...},
     "load_before", "load_after", ...}
with per mode: efficiency, gen_busy, train_busy (ratios of sums), the per-step medians (and
``*_mean``) of step_s (P), gen_s (G), train_s (T), trainer_step_s, wait_s (trainer's wait for
rollouts), weights_s, handoff_s (P - G - T), lag (sampled step - weights step), and wall_s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import _toy
from benchmarks.harness import record


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def step_rows(records: list[dict]) -> list[dict]:
    """One row per orchestrator step N, with the trainer step that published weights N (it
    trained on rollouts N-1). In the sync run the orchestrator waits for exactly that
    training before it samples N; in the async run that training runs while N is sampled."""
    orch = _toy.per_step(records, "orchestrator")
    trainer = _toy.per_step(records, "trainer")
    rows = []
    for n in sorted(orch):
        o, t = orch[n], trainer.get(n)
        row = {"step": n, "weights_s": o["time_weights_s"], "gen_s": o["time_sample_s"] + o["time_score_s"],
               "step_s": o["time_step_s"], "lag": n - o.get("weight_step", n)}
        if t is not None:
            row.update(wait_s=t["time_wait_s"], train_s=t["time_step_s"] - t["time_wait_s"],
                       trainer_step_s=t["time_step_s"])
            row["overlap_eff"] = max(row["gen_s"], row["train_s"]) / row["step_s"]
            row["handoff_s"] = row["step_s"] - row["gen_s"] - row["train_s"]
        rows.append(row)
    return rows


def steady_rows(rows: list[dict], skip: int) -> list[dict]:
    """Without the first ``skip`` steps (warm-up) and the last (final checkpoint)."""
    return [r for r in rows[skip:-1] if "train_s" in r]


def summarise(steady: list[dict]) -> dict:
    """Steady-state figures of one mode.

    Within a run, busy fractions and the efficiency are ratios of SUMS over the window (time
    a side was busy / wall time of the window): a neighbour's burst on the shared machine
    stretches numerator and denominator alike, and the sums do not depend on how orchestrator
    and trainer steps are paired. Across runs (speed-up), step times are MEDIANS of the
    per-step values, which a burst in one run moves less than the mean (kept as ``*_mean``).
    """
    out: dict = {"steady_steps": len(steady)}
    for k in ("step_s", "gen_s", "train_s", "trainer_step_s", "weights_s", "wait_s", "handoff_s", "lag"):
        values = [r[k] for r in steady]
        out[k] = median(values)
        out[f"{k}_mean"] = mean(values)
    total = sum(r["step_s"] for r in steady)
    out["gen_busy"] = sum(r["gen_s"] for r in steady) / total if total else float("nan")
    out["train_busy"] = sum(r["train_s"] for r in steady) / total if total else float("nan")
    out["efficiency"] = max(out["gen_busy"], out["train_busy"])
    return out


def show(name: str, rows: list[dict], skip: int) -> None:
    print(f"\n{name}, per step N: weights = wait for + load of the weights N samples with, G = sample + score,\n"
          f"P = orchestrator step; trainer step N (trained on rollouts N-1, published weights N): its wait for\n"
          f"rollouts and T = step - wait; eff = max(G, T) / P; * = steady state")
    print(f"{'N':>4}  {'weights':>7} {'G':>6} {'P':>6} | {'wait':>6} {'T':>6} {'trainer':>7} | {'eff':>5} {'lag':>3}")
    for i, r in enumerate(rows):
        mark = "*" if skip <= i < len(rows) - 1 and "train_s" in r else " "
        nan = float("nan")
        print(f"{r['step']:4d}{mark} {r['weights_s']:7.2f} {r['gen_s']:6.2f} {r['step_s']:6.2f} | "
              f"{r.get('wait_s', nan):6.2f} {r.get('train_s', nan):6.2f} {r.get('trainer_step_s', nan):7.2f} | "
              f"{r.get('overlap_eff', nan):5.2f} {r['lag']:3d}")


def describe(label: str, s: dict) -> None:
    print(f"{label}: {s['steady_steps']} steady steps, median (mean) per step: P {s['step_s']:.2f} s "
          f"({s['step_s_mean']:.2f}), G {s['gen_s']:.2f} s ({s['gen_s_mean']:.2f}), T {s['train_s']:.2f} s "
          f"({s['train_s_mean']:.2f}); busy: generation {s['gen_busy']:.0%}, training {s['train_busy']:.0%}; "
          f"max(sum G, sum T) / sum P {s['efficiency']:.2f}, weights lag {s['lag']:.0f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--skip", type=int, default=3, help="start-up steps left out of the steady state")
    p.add_argument("--rounds", type=int, default=1, help="run sync, async this many times, interleaved; steps pooled")
    p.add_argument("--prompts", type=int, default=4, help="orchestrator.prompts_per_step")
    p.add_argument("--samples", type=int, default=4, help="sampling.samples_per_prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="sampling.max_response_tokens")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (0: unset)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more stage overrides")
    args = p.parse_args()

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="async_overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    data = _toy.write_jsonl(_toy.make_problems(4000, seed=0), work / "additions.jsonl")
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    overrides = [
        "model.name=tiny", f"data.train={data}", f"data.cache_dir={work / 'cache'}", "data.max_prompt_tokens=64",
        # prompt + response, and room for the weight-sync probe (up to 128 tokens) when that is more
        f"inference.max_model_len={max(64 + args.max_tokens, 160)}",
        f"orchestrator.prompts_per_step={args.prompts}", f"sampling.samples_per_prompt={args.samples}",
        f"sampling.max_response_tokens={args.max_tokens}", "sampling.temperature=1.0",
        "orchestrator.reward.workers=1", "trainer.loss.kl_coef=0.0", "checkpoint.interval=100000",
        *args.overrides,
    ]
    load_before = _toy.load_average()
    print(f"work folder {work}; {args.steps} steps of {args.prompts}x{args.samples} responses of "
          f"{args.max_tokens} tokens; OMP_NUM_THREADS={args.threads or 'unset'}; load average before: {load_before}",
          flush=True)
    steady: dict[int, list[dict]] = {0: [], 1: []}
    walls: dict[int, list[float]] = {0: [], 1: []}
    for rnd in range(args.rounds):
        for level in (0, 1):
            name = f"async{level}-r{rnd}"
            records, wall, _ = _toy.run_stage(work / "runs", args.steps,
                                              [*overrides, f"orchestrator.async_level={level}"], env=env, name=name)
            rows = step_rows(records)
            show(f"async_level={level}, round {rnd} ({wall:.0f} s wall)", rows, args.skip)
            describe(f"async_level={level}, round {rnd}", summarise(steady_rows(rows, args.skip)))
            steady[level] += steady_rows(rows, args.skip)
            walls[level].append(wall)
    load_after = _toy.load_average()

    sync, asyn = summarise(steady[0]), summarise(steady[1])
    print()
    describe("sync  (async_level=0)", sync)
    describe("async (async_level=1)", asyn)
    speedup = sync["step_s"] / asyn["step_s"]
    ideal = 1.0 / sync["efficiency"]  # the sync step over its slower side
    isolated = max(sync["gen_s"], sync["train_s"]) / asyn["step_s"]
    print(f"sync step (means) {sync['step_s_mean']:.2f} s = generation {sync['gen_s_mean']:.2f} + training "
          f"{sync['train_s_mean']:.2f} + hand-offs {sync['handoff_s_mean']:.2f} (filesystem polling, weight load)")
    print(f"async step {asyn['step_s']:.2f} s: speed-up {speedup:.2f}x (ideal {ideal:.2f}x = sync step / its slower "
          f"side); efficiency max(G, T) / P = {asyn['efficiency']:.2f} (target 0.85: "
          f"{'met' if asyn['efficiency'] >= 0.85 else 'NOT met'}); against the sync run's G and T "
          f"(each side alone on the machine): {isolated:.2f}")
    print(f"load average before {load_before}, after {load_after}")
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)

    def rounded(d: dict) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}

    out = {
        "efficiency": round(asyn["efficiency"], 3),
        "efficiency_vs_sync_work": round(isolated, 3),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "async_faster": bool(speedup > 1.0),
        "target_met": bool(asyn["efficiency"] >= 0.85),
        "sync_step_s": round(sync["step_s"], 3), "async_step_s": round(asyn["step_s"], 3),
        "sync_handoff_s": round(sync["handoff_s_mean"], 3),
        "sync": {**rounded(sync), "wall_s": [round(w, 1) for w in walls[0]]},
        "async": {**rounded(asyn), "wall_s": [round(w, 1) for w in walls[1]]},
        "steps": args.steps, "skip": args.skip, "rounds": args.rounds,
        "workload": {"prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens,
                     "threads": args.threads},
        "load_before": load_before, "load_after": load_after,
    }
    record("async_overlap", vars(args), out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
