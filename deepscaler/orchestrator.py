"""The orchestrator process: problems in, scored rollouts out.

    python -m deepscaler.orchestrator --config RUN/stageK/run.yaml [--resume-step N|latest]

For every step N it takes the next prompts of a seeded order, makes sure every inference
server holds recent enough weights (at most ``orchestrator.async_level`` steps behind, each
update checked by the weight-sync probe), samples ``samples_per_prompt`` completions per
prompt across all servers at once, scores them, and publishes ``rollouts/step_N`` with the
behaviour log-probs, the advantages and the weight step that produced them. Read it top to
bottom; the data order and the step statistics are small pure functions below it.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from deepscaler import faults
from deepscaler.advantages import group_advantages
from deepscaler.config import Config, ConfigError, load_config_args, parse_command_line, process_parser, server_names
from deepscaler.data import DataError, build_prompts, load_problems
from deepscaler.handover import Reporter, watch
from deepscaler.hf_loading import load_tokenizer, model_source
from deepscaler.inference.client import (SERVER_DIED_EXIT, InferenceClient, Sample, ServerDied, ServerError, ServerGone,
                                         log_tail, sync_weights, wait_for_servers)
from deepscaler.process import apply_process_settings, usable_cpus
from deepscaler.reward import BatchScorer
from deepscaler.rollouts import Rollout, read_rollout, write_rollout
from deepscaler.run_lock import refuse_outsider, require_ownership
from deepscaler.stage import checkpoint_state, first_step, previous_stage_checkpoint, resolve_resume
from deepscaler.store import RunStore, StoreError, cache_dir

log = logging.getLogger("deepscaler.orchestrator")


class StaleWeightsError(ServerError):
    """A server answered with weights older than the async limit allows."""


# --------------------------------------------------------------------------- the loop


def orchestrate(cfg: Config, resume: str | None = None) -> int:
    """Produce this stage's rollouts; returns the number of the last step written."""
    # ------------------------------------------------------------------ set-up
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    refuse_outsider(store, cfg.run.lock_stale_s)  # started by hand beside a running run: refused before writing
    store.ensure_dirs()
    for path in store.clean_partial("rollouts"):
        log.warning("removed an unfinished step left by a crash: %s", path)
    tokenizer = load_tokenizer(model_source(cfg), cfg.model.revision)
    problems, skipped = load_problems(cfg.data.train, cache_dir=str(cache_dir(cfg)))
    prompts, dropped = build_prompts(problems[: cfg.data.max_problems], tokenizer, cfg.data.max_prompt_tokens)
    if not prompts:
        raise DataError(f"{cfg.data.train}: no prompt fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    log.info("%d problems (%d records skipped, %d prompts over the token limit)", len(prompts), len(skipped), dropped)

    per_step, group = cfg.orchestrator.prompts_per_step, cfg.sampling.samples_per_prompt
    note = small_data_note(len(prompts), per_step)
    if note:
        log.warning(note)
    start = first_step(cfg, store)
    last = start + stage_steps(cfg.run.max_steps, len(prompts), per_step)
    step, progress = resume_point(cfg, store, resume, start)
    if step >= last:
        log.info("nothing to do: rollouts up to step %d exist", last - 1)
        return last - 1

    # Where this side stands (the rollouts step it writes next), for the trainer's waits; from
    # here on, so that a trainer waiting during the servers' start-up sees this side alive.
    with Reporter(store, "orchestrator", step) as report:
        names = server_names(cfg)
        clients = wait_for_servers(store, names, cfg.inference.startup_timeout_s,
                                   liveness_timeout_s=cfg.inference.liveness_timeout_s)
        for c in clients.values():
            c.timeout_s = cfg.orchestrator.request_timeout_s
        loaded = {name: c.health()["weight_step"] for name, c in clients.items()}  # weights each server holds
        pool = ThreadPoolExecutor(len(clients), thread_name_prefix="server")
        store.append_metrics({"source": "orchestrator", "event": "start", "step": step, "servers": names,
                              "problems": len(prompts), "prompts_dropped": dropped, "records_skipped": len(skipped)})

        # ------------------------------------------------------------------ the loop
        rc = cfg.orchestrator.reward
        with stop_requests_on_exit(clients, pool), \
                BatchScorer(rc.workers or None, rc.deadline_s, literal_integers=rc.integer_answers == "literal") as scorer:
            log.info("reward pool of %d worker(s); %d usable CPU(s)", scorer.num_workers, usable_cpus())
            while step < last:
                t0 = time.perf_counter()
                # Sample with weights at most async_level steps old: wait for them, load them.
                required = max(start, step - cfg.orchestrator.async_level)
                store.wait_for_step("weights", required, cfg.orchestrator.weights_timeout_s, or_newer=True,
                                    check=watch(store, "weights", required, or_newer=True))
                weight_step = update_servers(store, clients, loaded, pool, required)
                t_weights = time.perf_counter() - t0

                indices, progress = next_batch(len(prompts), per_step, progress)
                log.debug("step %d: problems %s, data progress %s", step, [prompts[i][0].id for i in indices], progress)
                batch = [prompts[i] for i in indices]
                seed = cfg.run.seed * 1_000_003 + step
                sampled = sample(clients, pool, [ids for _, _, ids in batch], group, cfg, seed)
                check_fresh(sampled, step, required)
                samples = [s for _, _, group_samples in sampled for s in group_samples]
                t_sample = time.perf_counter() - t0 - t_weights

                texts = tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
                golds = [problem.answers for problem, _, _ in batch for _ in range(group)]
                rewards = torch.tensor(scorer.score(list(zip(texts, golds))), dtype=torch.float32)
                if faults.armed("orchestrator.random_rewards") is not None:  # tests only: the tiny random model earns none
                    rewards = torch.bernoulli(torch.full_like(rewards, 0.5), generator=torch.Generator().manual_seed(step))
                t_score = time.perf_counter() - t0 - t_weights - t_sample

                final = step + 1 == last
                rollout = Rollout.from_sequences(
                    step=step,
                    weight_step=min(served for _, served, _ in sampled),
                    group_size=group,
                    problem_ids=[problem.id for problem, _, _ in batch],
                    prompt_ids=[ids for _, _, ids in batch for _ in range(group)],
                    response_ids=[s.token_ids for s in samples],
                    response_logprobs=[s.logprobs for s in samples],
                    rewards=rewards.tolist(),
                    advantages=group_advantages(rewards, group).tolist(),
                    truncated=[s.truncated for s in samples],
                    extra={"progress": progress, "final": final},
                )
                require_ownership(store)  # a run that lost the stage's lock stops before it writes again
                write_rollout(store, step, rollout)
                drop_consumed_rollouts(store)

                per_server = prompts_per_server(sampled, list(clients))
                record = {"source": "orchestrator", "step": step, "problem_ids": rollout.problem_ids,
                          "weight_step": rollout.weight_step, "server_prompts": per_server,
                          "weights_loaded": weight_step, **step_stats(rewards, group, samples),
                          "time_weights_s": t_weights, "time_sample_s": t_sample, "time_score_s": t_score,
                          "time_step_s": time.perf_counter() - t0}
                store.append_metrics(record)
                log.info("step %d: reward %.3f (all solved %.2f, none %.2f) length %.0f/%d truncated %.1f%% "
                         "weights %d, sample %.1fs score %.1fs; prompts per server: %s", step, record["reward_mean"],
                         record["solve_all"], record["solve_none"], record["response_length_mean"],
                         record["response_length_max"], 100 * record["truncation_rate"], rollout.weight_step, t_sample,
                         t_score, ", ".join(f"{name} {count}" for name, count in per_server.items()))
                step += 1
                report.at(step)
    return step - 1


@contextmanager
def stop_requests_on_exit(clients: dict[str, InferenceClient], pool: ThreadPoolExecutor):
    """On the way out, break off the requests still in flight: after one server failed, the
    others' (a long generation) would keep this process from exiting, and the stage from
    stopping, until they end."""
    try:
        yield
    finally:
        for c in clients.values():
            c.close()
        pool.shutdown(cancel_futures=True)


def resume_point(cfg: Config, store: RunStore, resume: str | None, start: int) -> tuple[int, dict]:
    """(first step to sample, data progress before it).

    Rollouts already published are kept and not sampled again, so a restart neither repeats
    nor skips a problem: the trainer, resumed from checkpoint C, reads rollouts C, C+1, ...
    as they were. ``--resume-step N`` (rewinding past newer checkpoints) drops rollouts >= N.
    """
    checkpoint = resolve_resume(store, resume) if resume is not None else None
    if resume not in (None, "latest"):
        dropped = store.delete_steps("rollouts", [s for s in store.stable_steps("rollouts") if s >= checkpoint])
        if dropped:
            log.warning("discarded rollouts %s, sampled after the checkpoint resumed from", dropped)
    newest = store.latest_stable("rollouts")
    if newest is not None and newest >= start and (checkpoint is None or newest >= checkpoint - 1):
        return newest + 1, read_rollout(store, newest).extra["progress"]
    if checkpoint is not None:
        return checkpoint, checkpoint_state(store, checkpoint)["progress"]["data"]
    prev = previous_stage_checkpoint(cfg, store)
    if prev is not None and not cfg.checkpoint.reset_data_order:
        return start, checkpoint_state(*prev)["progress"]["data"]
    return start, {"seed": cfg.run.seed * 100 + cfg.run.stage, "epoch": 0, "cursor": 0}


def update_servers(store: RunStore, clients: dict[str, InferenceClient], loaded: dict[str, int], pool,
                   required: int) -> int:
    """Bring every server to the newest stable weights (at least ``required``); returns that step.
    ``loaded`` (server name -> weights step it holds) is kept up to date.

    Each update is verified with the weight-sync probe (``sync_weights``); a server that fails
    it raises, and is never sampled from. Retention may delete a step between listing and
    loading it, so a failed load is retried once with the then newest step.
    """
    for attempt in range(2):
        target = store.latest_stable("weights")
        stale = [c for name, c in clients.items() if loaded[name] != target]
        try:
            for c, report in zip(stale, pool.map(lambda c: sync_weights(c, store, target), stale)):
                loaded[c.name] = target
                log.info("server %s loaded weights step %d in %.1fs (%s, probe max diff %.2g)", c.name,
                         target, report["seconds"], report["method"], report["probe_max_diff"])
            break
        except (ServerGone, ServerDied):
            raise  # frozen or dead: a retry would only wait for it again, or fail again
        except ServerError:
            if attempt or store.is_stable("weights", target):
                raise
    if target < required:  # cannot happen: required was stable and steps only grow
        raise StoreError(f"newest weights step {target} is older than the required {required}")
    return target


def sample(clients: dict[str, InferenceClient], pool, prompts: list[list[int]], n: int, cfg: Config,
           seed: int) -> list[tuple[str, int, list[Sample]]]:
    """Deal the prompts out to the servers (prompt j to server j mod S), one request each, all
    at once. Returns (server, weights step it sampled with, n samples) per prompt, in prompt
    order. Server k seeds its request with ``seed + k``: the same servers sample the same
    tokens again, which a bit-exact resume needs."""
    names = list(clients)
    s = cfg.sampling

    def ask(k: int):
        return clients[names[k]].generate(prompts[k::len(names)], n=n, max_tokens=s.max_response_tokens,
                                          temperature=s.temperature, top_p=s.top_p, seed=seed + k)

    busy = [k for k in range(len(names)) if prompts[k::len(names)]]
    out: list = [None] * len(prompts)
    for k, gen in zip(busy, pool.map(ask, busy)):
        for pos, samples in enumerate(gen.samples):
            out[k + pos * len(names)] = (names[k], gen.weight_step, samples)
    return out


def prompts_per_server(sampled: list[tuple[str, int, list[Sample]]], names: list[str]) -> dict[str, int]:
    """How many of the step's prompts each server sampled (each with samples_per_prompt
    completions): the load spread over the servers, 0 for an idle one."""
    counts = dict.fromkeys(names, 0)
    for name, _, _ in sampled:
        counts[name] += 1
    return counts


def check_fresh(sampled: list[tuple[str, int, list[Sample]]], step: int, required: int) -> None:
    """Refuse completions from weights older than the async limit allows (a server that
    missed an update, or reports a stale step): they would train on the wrong policy."""
    for name, served, _ in sampled:
        if served < required:
            raise StaleWeightsError(f"server {name} sampled step {step} with weights step {served}, older than "
                                    f"allowed ({required} = step - orchestrator.async_level)", server=name)


def drop_consumed_rollouts(store: RunStore) -> None:
    """Rollouts older than the newest checkpoint are never read again (a restart resumes from
    that checkpoint): delete them, they are the run's largest files."""
    newest = store.latest_stable("checkpoints")
    if newest is not None:
        store.delete_steps("rollouts", [s for s in store.stable_steps("rollouts") if s < newest])


# --------------------------------------------------------------------------- pure pieces


def permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The problem order of one epoch: seeded, and different every epoch."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def stage_steps(max_steps: int | None, problems: int, per_step: int) -> int:
    """Steps of a stage: ``run.max_steps``, else one epoch, and at least one step (a data set
    smaller than one step's prompts would otherwise run none)."""
    return max_steps or max(1, problems // per_step)


def small_data_note(problems: int, per_step: int) -> str | None:
    """The one-line warning for a data set smaller than one step's prompts, else None.

    Why a warning, not a refusal: overfitting a handful of problems is a legitimate test; but
    in a real run it is usually a mistake (``data.max_problems``, a wrong file), and each step
    then samples every problem several times over, as separate groups."""
    if problems >= per_step:
        return None
    return (f"the training data has {problems} problems, fewer than orchestrator.prompts_per_step={per_step}: "
            f"every step takes each problem up to {-(-per_step // problems)} times (in separate groups); lower "
            "orchestrator.prompts_per_step or use more data if that is not what you meant")


def next_batch(size: int, count: int, progress: dict) -> tuple[list[int], dict]:
    """The next ``count`` problem indices after ``progress`` ({seed, epoch, cursor}), and the
    progress after them. An epoch boundary inside a batch continues into the next epoch."""
    seed, epoch, cursor = progress["seed"], progress["epoch"], progress["cursor"]
    out: list[int] = []
    while len(out) < count:
        order = permutation(size, seed, epoch)
        taken = order[cursor : cursor + count - len(out)]
        out += taken
        cursor += len(taken)
        if cursor >= size:
            epoch, cursor = epoch + 1, 0
    return out, {"seed": seed, "epoch": epoch, "cursor": cursor}


def step_stats(rewards: torch.Tensor, group: int, samples) -> dict:
    """Reward, solve-all/solve-none fractions (groups that teach nothing: zero advantage),
    response lengths and truncation of one step."""
    per_group = rewards.view(-1, group)
    lengths = [len(s.token_ids) for s in samples]
    return {
        "reward_mean": float(rewards.mean()),
        "solve_all": float((per_group == 1).all(dim=1).float().mean()),
        "solve_none": float((per_group == 0).all(dim=1).float().mean()),
        "response_length_mean": sum(lengths) / len(lengths),
        "response_length_max": max(lengths),
        "truncation_rate": sum(s.truncated for s in samples) / len(samples),
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("python -m deepscaler.orchestrator", __doc__)
    parser.add_argument("--resume-step", help="the checkpoint the trainer resumes from, or 'latest'")
    args = parse_command_line(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphan workers
    try:
        cfg = load_config_args(args.config, args.overrides)
        apply_process_settings(cfg)
        orchestrate(cfg, args.resume_step)
    except ServerError as e:  # the server's own log says why it failed, hung or lagged; the error line last
        if e.server:
            print(log_tail(RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage), e.server, lines=12),
                  file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return SERVER_DIED_EXIT if isinstance(e, ServerDied) else 2
    except (ConfigError, StoreError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
