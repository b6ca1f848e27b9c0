"""The trainer process: rollouts in, weights and checkpoints out.

    python -m deepscaler.trainer --config RUN/stageK/run.yaml [--resume-step N|latest] [key=value ...]

For every step N it waits for ``rollouts/step_N``, runs the recipe's mini-batch updates,
publishes ``weights/step_{N+1}`` for the inference servers and, every
``checkpoint.interval`` steps, ``checkpoints/step_{N+1}`` with everything needed to resume.
Read it top to bottom; the pieces it calls are small and live beside it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch

from deepscaler.config import Config, ConfigError, load_config_args, parse_command_line, process_parser, tis_cap
from deepscaler.faults import maybe_crash
from deepscaler.handover import Reporter, watch
from deepscaler.hf_loading import load_causal_lm, load_tokenizer, model_source
from deepscaler.process import apply_process_settings, one_thread_if_small, usable_cpus, visible_gpus
from deepscaler.rollouts import mini_batches, read_rollout
from deepscaler.run_lock import LockLost, refuse_outsider, require_ownership
from deepscaler.stage import first_step as stage_first_step
from deepscaler.stage import previous_stage_checkpoint, resolve_resume
from deepscaler.store import RunStore, StoreError
from deepscaler.trainer import attention
from deepscaler.trainer.checkpoint import load_checkpoint, load_model_weights, publish_state, save_checkpoint
from deepscaler.trainer.engine import (all_reduce_sum, apply_optimizer_config, build_engine, close_distributed,
                                       init_distributed, max_over_ranks, prepare, update, use_bf16)
from deepscaler.trainer.packing import oversized, pack, plan_step
from deepscaler.trainer.publisher import publish_weights
from deepscaler.weights_format import as_dtype

log = logging.getLogger("deepscaler.trainer")

# Checkpoints kept besides the newest: one spare, so a crash while writing never leaves none.
KEEP_CHECKPOINTS = 2


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def train(cfg: Config, resume: str | None = None) -> int:
    """Run this stage's steps; returns the last step whose weights were published."""
    # ------------------------------------------------------------------ set-up
    dist = init_distributed()
    log.info("%s", dist.describe(os.environ))
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    refuse_outsider(store, cfg.run.lock_stale_s)  # started by hand beside a running run: refused before writing
    if dist.is_main:
        store.ensure_dirs()
        for path in store.clean_partial("checkpoints") + store.clean_partial("weights"):
            log.warning("removed an unfinished step left by a crash: %s", path)
    resume_step = resolve_resume(store, resume)
    device = dist.device
    dtype = "bfloat16" if use_bf16(cfg.trainer) else "float32"

    source = model_source(cfg)
    tokenizer = load_tokenizer(source, cfg.model.revision)
    attn = attention.resolve(cfg.trainer.attn_implementation, device, dtype)  # fp32 or sm<80: no flash kernel
    model = load_causal_lm(source, dtype, cfg.model.revision, attn_implementation=attn)
    one_thread_if_small(model, device)  # device: where it will compute (it loads on the CPU)
    if dist.is_main:
        log.info("trainer: %d rank(s), rank 0 on %s, attention %s, %d usable CPU(s), GPUs %s", dist.world_size, device,
                 attn, usable_cpus(), visible_gpus())
    init_from = None
    prev = previous_stage_checkpoint(cfg, store)
    if prev is not None:
        # Stage K+1 starts from stage K's newest checkpoint: no copying by hand. A resume loads
        # it too (its own checkpoint replaces the policy below): it is the stage's KL anchor.
        init_from = prev[0].step_dir("checkpoints", prev[1])
        load_model_weights(init_from, model)
        log.info("stage %d starts from %s", cfg.run.stage, init_from)
    # The KL anchor is the policy this stage started from, as in verl (the base model in stage 1).
    ref_model = _frozen_copy(model).to(device)

    updates_per_step = cfg.trainer.mini_batches_per_step * cfg.trainer.ppo_epochs
    total_steps = cfg.run.max_steps or 10**6
    engine = build_engine(model, cfg.trainer, total_steps * updates_per_step)

    # ------------------------------------------------------------------ where to start
    if resume_step is not None:
        state = load_checkpoint(store.step_dir("checkpoints", resume_step), engine, scheduler=engine.lr_scheduler)
        apply_optimizer_config(engine, cfg.trainer)  # the checkpoint's lr is not run.yaml's after --allow-config-change
        step, first_step = state["step"], state["progress"]["stage_first_step"]
        log.info("resumed from %s", store.step_path("checkpoints", resume_step))
    else:
        if init_from is not None and cfg.checkpoint.load_optimizer:
            load_checkpoint(init_from, engine, scheduler=None, restore_rng=False)
            apply_optimizer_config(engine, cfg.trainer)  # this stage's lr, not stage K's
        step = first_step = stage_first_step(cfg, store)
    # What was published after the start step belongs to an interrupted attempt: it is
    # recomputed below (bit-identically in deterministic mode) and must be republished.
    stop_if_lock_lost(store, dist)
    if dist.is_main:
        for kind in ("weights", "checkpoints"):
            dropped = store.delete_steps(kind, [s for s in store.stable_steps(kind) if s > step])
            if dropped:
                log.warning("discarded %s steps %s, newer than the start step %d", kind, dropped, step)
    # Where this side stands (the weights step it writes next), for the orchestrator's waits.
    with Reporter(store, "trainer", step, active=dist.is_main) as report:
        # Rank 0 decides (its view of the filesystem), so every rank joins the same collectives.
        if all_reduce_sum([float(dist.is_main and not store.is_stable("weights", step))])[0]:
            publish(store, step, engine, tokenizer, dtype, dist)  # what the servers start from
        report.at(step + 1)
        last_step = first_step + total_steps
        if dist.is_main:
            store.append_metrics({"source": "trainer", "event": "start", "step": step, "resumed_from": resume_step,
                                  "init_from": str(init_from) if init_from else None, "world_size": dist.world_size})

        # ------------------------------------------------------------------ the loop
        while step < last_step:
            t0 = time.perf_counter()
            store.wait_for_step("rollouts", step, cfg.trainer.rollout_timeout_s, check=watch(store, "rollouts", step))
            rollout = read_rollout(store, step)
            t_wait = time.perf_counter() - t0

            # This rank's packed micro-batches of each mini-batch, then what every update needs
            # from the policy as it is now (old log-probs, reference log-probs, IS weights).
            minis = []
            for indices in mini_batches(rollout, cfg.trainer.mini_batches_per_step):
                lengths = rollout.seq_lengths
                plan = plan_step(lengths, dist.world_size, cfg.trainer.micro_batch_tokens, indices=indices)
                for i in oversized(lengths, cfg.trainer.micro_batch_tokens, indices):
                    log.warning("sequence %d (%d tokens) exceeds trainer.micro_batch_tokens", i, lengths[i])
                minis.append(([pack(rollout, micro).to(device) for micro in plan[dist.rank]],
                              sum(rollout.response_lengths[i] for i in indices)))
            log.debug("step %d: %d micro-batch(es) on rank %d, %d tokens", step, sum(len(b) for b, _ in minis),
                      dist.rank, sum(b.num_tokens for batches, _ in minis for b in batches))
            prepared = {k: float(v) for k, v in prepare(engine, ref_model, [b for batches, _ in minis for b in batches],
                                                          cfg.trainer, cfg.sampling.temperature, tis_cap(cfg)).items()}
            stats = []
            for _ in range(cfg.trainer.ppo_epochs):
                for batches, loss_tokens in minis:
                    stats.append(update(engine, batches, loss_tokens, cfg.trainer, cfg.sampling.temperature,
                                        dist.world_size))
            step += 1
            t_train = time.perf_counter() - t0 - t_wait
            if rollout.extra.get("final"):
                last_step = step  # the orchestrator's last batch (one epoch when run.max_steps is unset)
            record = _step_metrics(stats, prepared, rollout, engine, cfg.trainer.ppo_epochs, t_wait, t_train, t_train)
            refuse_non_finite(record, step, store)  # before these weights reach a server or a checkpoint

            stop_if_lock_lost(store, dist)
            publish(store, step, engine, tokenizer, dtype, dist)
            report.at(step + 1)
            if step % cfg.checkpoint.interval == 0 or step == last_step:
                stop_if_lock_lost(store, dist)
                save_checkpoint(store, step, engine, scheduler=engine.lr_scheduler,
                                progress={"stage_first_step": first_step, "data": rollout.extra.get("progress")})
            if dist.is_main:
                # Steps an eval sweep has claimed (evals/step_N/PENDING) stay until evaluated.
                store.apply_retention("weights", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                      protected=store.pending_evals())
                store.apply_retention("checkpoints", KEEP_CHECKPOINTS)
            record["time_step_s"] = time.perf_counter() - t0
            if dist.is_main:
                store.append_metrics({"source": "trainer", "step": step, **record})
                log.info("step %d: loss %.4f kl %.5f entropy %.3f grad_norm %.3f %.0f tok/s",
                         step, record["pg_loss"], record["kl"], record["entropy"], record["grad_norm"], record["tokens_per_s"])
            maybe_crash("trainer.after_step", step)
    return step


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm. The message is one line."""


def refuse_non_finite(record: dict, step: int, store: RunStore) -> None:
    """Stop at a step whose loss terms or gradient norm are not finite: its weights are never
    published, and a resume starts from the newest checkpoint before it."""
    keys = ("pg_loss", "kl", "entropy", "grad_norm")
    bad = {k: record[k] for k in keys if record.get(k) is not None and not math.isfinite(record[k])}
    if bad:
        latest = store.latest_stable("checkpoints")
        raise TrainingDiverged(
            f"step {step}: {', '.join(f'{k} {v}' for k, v in bad.items())}: stopped before publishing these weights; "
            f"resume with --resume-step {latest if latest is not None else 'latest'} --allow-config-change and a "
            "lower trainer.optimizer.lr, or check the rollouts of this step")


def stop_if_lock_lost(store: RunStore, dist) -> None:
    """Before each write: stop (LockLost, one line) if this run no longer holds the stage's lock
    (removed by hand, or taken over), so it never writes beside the run that holds it now. Rank 0
    reads the lock; every rank stops together."""
    lost = None
    if dist.is_main:
        try:
            require_ownership(store)
        except LockLost as e:
            lost = e
    if all_reduce_sum([float(lost is not None)])[0]:
        raise lost or LockLost(f"{store.root}: rank 0 found that this run no longer holds the stage's lock; stopped")


def publish(store: RunStore, step: int, engine, tokenizer, dtype: str, dist) -> None:
    """Publish ``weights/step_N`` from rank 0, its probe computed on rank 0's device.
    Collective: under ZeRO-3 every rank holds a shard of the weights, so all ranks take part
    in gathering them."""
    state = publish_state(engine, as_dtype(dtype))
    if dist.is_main:
        publish_weights(store, step, engine.module, tokenizer, dtype=dtype, state_dict=state, probe_device=dist.device)


def _frozen_copy(model):
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _step_metrics(stats, prepared: dict, rollout, engine, epochs: int, t_wait: float, t_train: float,
                  t_step: float) -> dict:
    """The step's record in metrics.jsonl, summed over ranks: the loss terms as a mean over the
    step's updates (each rank's share was already divided by the mini-batch's token count,
    times the world size); the first update's ratio and clipping, which with
    ``old_logprobs: trainer`` are exactly 1 and 0; the sampler/trainer mismatch and the
    truncated-IS statistics, where computed (:func:`deepscaler.trainer.engine.prepare`)."""
    n, first = len(stats), stats[0]
    keys = sorted(k for k in prepared if k != "mismatch_max")
    totals = all_reduce_sum([
        sum(s.pg_loss for s in stats), sum(s.kl for s in stats), sum(s.entropy for s in stats),
        sum(s.clip_fraction for s in stats), sum(s.tokens for s in stats),
        first.ratio, first.clip_fraction, first.loss_tokens, *(prepared[k] for k in keys),
    ])
    pg, kl, ent, clip, tokens, ratio0, clip0, tokens0 = totals[:8]
    mixed = dict(zip(keys, totals[8:]))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    loss_tokens = epochs * sum(rollout.response_lengths)
    grad_norm = engine.get_global_grad_norm()
    record = {
        "pg_loss": pg / n / world,
        "kl": kl / n / world,
        "entropy": ent / n / world,
        "clip_fraction": clip / max(loss_tokens, 1),
        "first_update_ratio_mean": ratio0 / max(tokens0, 1),
        "first_update_clip_fraction": clip0 / max(tokens0, 1),
    }
    if "mismatch_kl" in mixed:
        record["mismatch_kl"] = mixed["mismatch_kl"] / max(mixed["loss_tokens"], 1)
        record["mismatch_max"] = max_over_ranks(prepared["mismatch_max"])
    for k in ("tis_weight_mean", "tis_clipped_fraction"):
        if k in mixed:
            record[k] = mixed[k] / max(mixed["loss_tokens"], 1)
    return {
        **record,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": engine.lr_scheduler.get_last_lr()[0],
        "weight_step": rollout.weight_step,
        "tokens": int(tokens),
        "tokens_per_s": tokens / max(t_train, 1e-9),
        "time_wait_s": t_wait,
        "time_train_s": t_train,
        "time_step_s": t_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("python -m deepscaler.trainer", __doc__)
    parser.add_argument("--resume-step", help="a checkpoint step, or 'latest'")
    args = parse_command_line(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(levelname)s %(message)s")
    try:
        cfg = load_config_args(args.config, args.overrides)
        apply_process_settings(cfg)
        train(cfg, args.resume_step)
        close_distributed(together=True)
    except (ConfigError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
