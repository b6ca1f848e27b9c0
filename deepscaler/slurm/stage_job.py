"""A training stage as a Slurm job: its requests, its job steps, the supervisor inside it.

Four layouts (:func:`layout`):

- ``shared`` (``slurm.layout: shared``): every GPU of the stage runs one server and one trainer
  rank, which take turns (sample, then train). One ordinary allocation of the pooled nodes
  (``config.shared_shape``); one job step runs every server and trainer rank, a task each,
  so that Slurm divides the CPUs between them while they share the GPUs
  (``deepscaler.slurm.shared_task``).
- ``colocated``: when the servers and the trainer fit on one node (stage 1's 4 + 4 GPUs on
  one 8-GPU node), one ordinary allocation whose job steps take disjoint GPUs. A
  heterogeneous job cannot do this: Slurm never puts two of its components on one node, so
  4 + 4 would hold two nodes with 4 GPUs idle on each.
- ``hetjob``: component 0 holds the inference servers, component 1 the trainer ranks and the
  orchestrator (multi-node shapes).
- ``two_jobs`` (``slurm.hetjob: false``): the servers are a job of their own
  (:class:`ServersJob`), for clusters without hetjob support.

The batch shell runs submitit's job runner, which calls :class:`StageJob`: the same supervisor
as ``--executor local`` (``deepscaler.launch``), with every process started as an ``srun`` job
step. The processes find each other through the run directory (``servers/<name>.addr``); the
trainer ranks rendezvous at the trainer's first node (``MASTER_ADDR``/``MASTER_PORT``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import submitit

from deepscaler import handover
from deepscaler.config import Config, ConfigError, load_config, server_names, shared_shape, stage_layout
from deepscaler.inference.client import resume_point
from deepscaler.inference.contract import TOKEN_ENV, TokenError, read_token, write_token
from deepscaler.process import apply_process_settings
from deepscaler.slurm.jobs import (FAILED, ScriptExecutor, first_node_address, job_state, runner_command,
                                  wait_for_jobs)
from deepscaler.slurm.options import Request, quote
from deepscaler.store import RunStore, StoreError, private_dir


def job_name(cfg: Config, servers: bool = False) -> str:
    """``s<K>-<run>-deepscaler`` (``s<K>i-...``: the servers' job of a two-jobs stage): stage
    and run first, because squeue's default NAME column shows 8 characters; the whole name is
    in sacct's JobName and ``squeue -o %j``."""
    return f"s{cfg.run.stage}{'i' if servers else ''}-{cfg.run.name}-deepscaler"


def job_folder(cfg: Config) -> Path:
    """submitit's folder of a stage (pickles, the sbatch script, the runner's logs)."""
    return RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).logs_dir / "slurm"


def component_tasks(cfg: Config, component: str) -> int:
    """Tasks per node: one per server (inference), one per GPU rank (trainer), at least one."""
    res = getattr(cfg.slurm, component)
    if component == "inference":
        return max(1, len(server_names(cfg)) // res.nodes)
    return max(1, res.gpus_per_node)


def cpus_per_task(cfg: Config, component: str) -> int:
    """CPUs of one task: ``cpus_per_gpu`` for each GPU it drives (a server drives
    ``tensor_parallel``), or ``cpus_per_gpu`` when the component has no GPUs."""
    res = getattr(cfg.slurm, component)
    gpus = cfg.inference.tensor_parallel if component == "inference" else 1
    return res.cpus_per_gpu * (gpus if res.gpus_per_node else 1)


def request(cfg: Config, component: str) -> Request:
    res = getattr(cfg.slurm, component)
    return Request(res.nodes, component_tasks(cfg, component), cpus_per_task(cfg, component), res.gpus_per_node,
                   res.mem)


def fits_one_node(cfg: Config) -> bool:
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    return inf.nodes == tr.nodes == 1 and inf.gpus_per_node + tr.gpus_per_node <= cfg.slurm.gpus_per_node_max


def layout(cfg: Config) -> str:
    """``shared``, ``colocated``, ``hetjob`` or ``two_jobs`` (module doc). A split stage
    (``slurm.layout``) is placed by ``slurm.colocate``: auto colocates whenever both components
    fit on one node; config validation refuses true when they do not."""
    if stage_layout(cfg) == "shared":
        return "shared"
    if cfg.slurm.colocate is True or (cfg.slurm.colocate == "auto" and fits_one_node(cfg)):
        return "colocated"
    return "hetjob" if cfg.slurm.hetjob else "two_jobs"


def colocated_request(cfg: Config) -> Request:
    """One node for every task of both components; each job step then takes its share."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    tasks = component_tasks(cfg, "inference") + component_tasks(cfg, "trainer")
    cpus = max(cpus_per_task(cfg, "inference"), cpus_per_task(cfg, "trainer"))
    return Request(1, tasks, cpus, inf.gpus_per_node + tr.gpus_per_node, tr.mem or inf.mem)


def shared_request(cfg: Config) -> Request:
    """The pooled nodes, each with a task (and its CPUs) per server and per trainer rank on it."""
    from deepscaler.slurm.shared_task import per_node

    nodes, gpus = shared_shape(cfg)
    return Request(nodes, sum(per_node(cfg)), shared_cpus_per_task(cfg), gpus, cfg.slurm.trainer.mem or cfg.slurm.inference.mem)


def shared_cpus_per_task(cfg: Config) -> int:
    """CPUs of every task of the shared step (a step has one ``--cpus-per-task``): each GPU's
    ``cpus_per_gpu`` (the larger of the two components') divided between the server and the
    trainer rank on it, so the node holds as many CPUs as a split stage's; on CPU, a task's."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    if not shared_shape(cfg)[1]:
        return max(inf.cpus_per_gpu, tr.cpus_per_gpu)
    return max(1, max(inf.cpus_per_gpu, tr.cpus_per_gpu) // 2)


def main_job_requests(cfg: Config) -> list[tuple[str, Request]]:
    """(what, request) of each component of the stage's main job."""
    if layout(cfg) == "shared":  # not built for the other layouts: shared_shape refuses their shapes
        return [("servers and trainer ranks sharing every GPU, and the orchestrator", shared_request(cfg))]
    return {
        "colocated": [("servers, trainer and orchestrator on one node", colocated_request(cfg))],
        "hetjob": [("inference server(s)", request(cfg, "inference")), ("trainer + orchestrator", request(cfg, "trainer"))],
        "two_jobs": [("trainer + orchestrator", request(cfg, "trainer"))],
    }[layout(cfg)]


def executor(cfg: Config, folder: Path, parts: list[tuple[str, Request]], dependency: str | None,
             name: str | None = None) -> ScriptExecutor:
    what = ", ".join(f"component {i} = {w}" for i, (w, _) in enumerate(parts)) if len(parts) > 1 else parts[0][0]
    return ScriptExecutor(folder, cfg.slurm, [r for _, r in parts], name=name or job_name(cfg), comment=what,
                          dependency=dependency)


def stage_script(cfg: Config, folder: Path, command: str, dependency: str | None = None, servers: bool = False) -> str:
    """The sbatch script of a stage's main job (``servers``: of its servers' job, two_jobs only)."""
    if servers:
        return executor(cfg, folder, [("inference server(s)", request(cfg, "inference"))], dependency,
                        job_name(cfg, servers=True)).render(command)
    return executor(cfg, folder, main_job_requests(cfg), dependency).render(command)


# --------------------------------------------------------------------------- inside the job


def job_steps(cfg: Config, run_yaml: Path, resume: str | None) -> dict[str, list[str]]:
    """The stage's processes as job steps: one step runs every server (each task names itself
    ``server<SLURM_PROCID>``), one runs the trainer ranks, and the orchestrator shares the
    trainer's first node (``--overlap``; ``--mem=0`` because the trainer step holds the node's
    memory). In a hetjob the steps name their component (``--het-group``); colocated, the
    server and trainer steps take only what they ask for (``--exact``), so both run at once in
    the one allocation, and Slurm gives them disjoint GPUs.

    Every step says ``--cpus-per-task``: srun of Slurm 22.05-23.02 does not inherit it from
    sbatch, and a task would get one CPU. GPUs (docs/cluster.md, "Job steps"): each server
    task is bound to its own ``tensor_parallel`` GPUs (``--gpus-per-task``), so vLLM sees them
    as cuda:0..TP-1; the trainer's tasks share the node's trainer GPUs (``--gpus-per-node``
    and no per-task request: every task gets them all) and each rank takes the one at its
    local rank, so the ranks can reach each other's GPUs for NCCL's peer-to-peer transfers
    where a cluster constrains devices per task. Not ``--gpu-bind=none``: with several tasks,
    Slurm 22.05 then sets no ``CUDA_VISIBLE_DEVICES`` at all (found on the local cluster), and
    on a node without device cgroups rank r would take the node's GPU r, whoever holds it."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    py, config = sys.executable, ["--config", str(run_yaml)]
    resume_args = ["--resume-step", resume] if resume is not None else []
    step = ["srun", "--unbuffered", "--kill-on-bad-exit=1"]
    how = layout(cfg)
    place = {"hetjob": lambda k: [f"--het-group={k}"], "colocated": lambda k: ["--exact"]}.get(how, lambda k: [])
    # Steps name their GPUs and tasks in full: a step of a colocated allocation would otherwise
    # inherit the job's SLURM_GPUS_PER_NODE and SLURM_NTASKS and ask for all of them.
    server_gpus = ([f"--gpus-per-node={inf.gpus_per_node}", f"--gpus-per-task={cfg.inference.tensor_parallel}"]
                   if inf.gpus_per_node else [])
    trainer_gpus = [f"--gpus-per-node={tr.gpus_per_node}"] if tr.gpus_per_node else []
    trainer_tasks = component_tasks(cfg, "trainer")
    if how == "shared":
        return shared_job_steps(cfg, step, py, config, resume_args)
    return {
        "servers": [*step, *place(0), f"--nodes={inf.nodes}", f"--ntasks={len(server_names(cfg))}",
                    f"--cpus-per-task={cpus_per_task(cfg, 'inference')}", *server_gpus,
                    py, "-m", "deepscaler.inference", *config, "--name", "server{rank}"],
        "trainer": [*step, *place(1), f"--nodes={tr.nodes}", f"--ntasks={tr.nodes * trainer_tasks}",
                    f"--ntasks-per-node={trainer_tasks}",
                    f"--cpus-per-task={cpus_per_task(cfg, 'trainer')}", *trainer_gpus,
                    py, "-m", "deepscaler.trainer", *config, *resume_args],
        "orchestrator": [*step, *(place(1) if how == "hetjob" else []), "--nodes=1", "--ntasks=1",
                         f"--cpus-per-task={cpus_per_task(cfg, 'trainer')}", "--overlap", "--mem=0",
                         py, "-m", "deepscaler.orchestrator", *config, *resume_args],
    }


def shared_job_steps(cfg: Config, step: list[str], py: str, config: list[str],
                     resume_args: list[str]) -> dict[str, list[str]]:
    """A shared stage's two steps: ``shared``, every server and trainer rank as a task of its
    own (``deepscaler.slurm.shared_task`` says which is which), all seeing the node's GPUs; and
    the orchestrator beside them on the first node, as in the other layouts."""
    req = shared_request(cfg)
    gpus = [f"--gpus-per-node={req.gpus_per_node}"] if req.gpus_per_node else []
    return {
        "shared": [*step, f"--nodes={req.nodes}", f"--ntasks={req.nodes * req.ntasks_per_node}",
                   f"--ntasks-per-node={req.ntasks_per_node}", f"--cpus-per-task={req.cpus_per_task}", *gpus,
                   py, "-m", "deepscaler.slurm.shared_task", *config, *resume_args],
        "orchestrator": [*step, "--nodes=1", "--ntasks=1", f"--cpus-per-task={shared_cpus_per_task(cfg)}",
                         "--overlap", "--mem=0", py, "-m", "deepscaler.orchestrator", *config, *resume_args],
    }


def job_commands(cfg: Config, run_yaml: Path, resume: str | None) -> dict[str, list[str]]:
    """What the stage's supervisor starts: every step, less the servers when they are a job of
    their own (``two_jobs``)."""
    steps = job_steps(cfg, run_yaml, resume)
    if layout(cfg) == "two_jobs":
        del steps["servers"]
    return steps


class StageJob(submitit.helpers.Checkpointable):
    """What the job runs: the stage supervisor (``deepscaler.launch.run_stage``) with every
    process placed by ``srun``. Checkpointable: at the time limit or on preemption submitit
    calls :meth:`checkpoint` and requeues; the next attempt resumes from the newest stable
    checkpoint, as does an attempt that Slurm requeued by itself (node failure)."""

    def __init__(self, run_yaml: str, resume: str | None = None, servers_job: str | None = None):
        self.run_yaml = str(run_yaml)
        self.resume = resume
        self.servers_job = servers_job  # two_jobs: the job that runs the servers

    def __call__(self) -> str:
        from deepscaler.launch import LaunchError, run_stage

        cfg = load_config(self.run_yaml)
        apply_process_settings(cfg)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        resume = "latest" if restarts else self.resume
        nodes = os.environ.get("SLURM_JOB_NODELIST_HET_GROUP_1") or os.environ.get("SLURM_JOB_NODELIST", "")
        job_id = os.environ.get("SLURM_JOB_ID", "0")
        env = {"MASTER_ADDR": first_node_address(nodes) if nodes else "127.0.0.1",
               "MASTER_PORT": str(20000 + int(job_id) % 20000),
               TOKEN_ENV: read_token(RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).root)}
        print(f"attempt {restarts + 1} of job {job_id}: resume {resume or 'no (fresh start)'}", flush=True)
        states: list[str | None] = []

        def announce() -> None:  # at once: Slurm kills the job KillWait seconds after its SIGTERM
            states.append(job_state(job_id))
            print(stopped_line(cfg, job_id, states[0]), file=sys.stderr, flush=True)

        sigterm = Sigterm(announce)
        try:
            with sigterm.raising():
                store = run_stage(cfg, resume, commands=job_commands, extra_env=env,
                                  event={"slurm_job_id": job_id, "restart_count": restarts})
        except (Cancelled, LaunchError) as e:  # its line last, for submit --wait (:func:`stage_error`); no traceback
            if not (states and states[0] in REQUEUE_STATES):  # the stage is over: its servers' job ends with it
                self.stop_servers_job()
            if sigterm.received:  # a process killed by the job's own SIGTERM (exit 143) is the stop, not the cause
                raise SystemExit(143) from None
            line, _, tail = str(e).partition("\n")
            print(f"{tail}\nerror: {line}".lstrip("\n"), file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        self.stop_servers_job()
        return str(store.root)

    def stop_servers_job(self) -> None:
        if self.servers_job:
            subprocess.run(["scancel", self.servers_job], check=False)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(StageJob(self.run_yaml, "latest", self.servers_job))


class Cancelled(Exception):
    """The stage's supervisor got SIGTERM (:class:`Sigterm`)."""


# sacct states of a job that Slurm has queued again (a requeue, a node failure): it resumes by itself.
REQUEUE_STATES = ("REQUEUED", "PENDING", "REQUEUE_HOLD", "REQUEUE_FED")


class Sigterm:
    """SIGTERM to the supervisor (the batch job's one task) is Slurm stopping the job: ``scancel``,
    or Slurm itself (a requeue, a node failure, the end of the time limit). It stops the stage
    as Ctrl-C stops a local one: :class:`Cancelled` in the main thread, once, while
    :meth:`raising`, so that ``run_stage`` stops every process on its way out; ``received``
    tells a process that the stop killed (exit 143) from a failure. ``announce`` runs at the
    first one, before anything is stopped: what is said must be said before Slurm's SIGKILL.
    submitit only logs a SIGTERM; its requeue signal (USR2, ``options.script``'s ``--signal``)
    still checkpoints and requeues, and the SIGTERM of that requeue is ignored as before."""

    def __init__(self, announce: Callable[[], None] = lambda: None):
        self.received = self.armed = self.requeueing = False
        self.announce = announce
        submitit_requeue = signal.getsignal(signal.SIGUSR2)

        def on_requeue(signum, frame):
            self.requeueing = True
            if callable(submitit_requeue):
                submitit_requeue(signum, frame)

        signal.signal(signal.SIGUSR2, on_requeue)
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, signum, frame) -> None:
        if self.requeueing:
            return
        if not self.received:
            self.received = True
            self.announce()
        if self.armed:
            self.armed = False
            raise Cancelled("SIGTERM")

    @contextlib.contextmanager
    def raising(self):
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


def stopped_line(cfg: Config, job_id: str, state: str | None) -> str:
    """The last line of a stage job that got SIGTERM, by what sacct says of the job now
    (``state``, None without an answer): cancelled or ended by Slurm, with the command line that
    resumes it; or requeued, with where its next attempt starts."""
    store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
    orchestrator = handover.read(store, "orchestrator")
    stage = f"stage {cfg.run.stage} of run '{cfg.run.name}'"
    during = f" during step {orchestrator.step}" if orchestrator else ""
    since = resume_point(store.latest_stable("checkpoints"))
    if state in REQUEUE_STATES:
        return f"stopped: {stage}{during}: Slurm requeued job {job_id} ({state}); its next attempt resumes from {since}"
    how = ("cancelled (scancel)" if state == "CANCELLED" else f"ended by Slurm ({state})" if state in FAILED
           else "got SIGTERM (scancel, or Slurm)")
    return f"stopped: {stage} {how}{during}. Resume with --resume-step latest (from {since}): {resume_command(store)}"


def resume_command(store: RunStore) -> str:
    """The command line that resumes a stage from its newest checkpoint, with the config it ran
    with: its run.yaml as the preset sets every key, whatever the submit's own command line was."""
    return shlex.join(["python", "-m", "deepscaler.submit", "--stage", str(store.stage), "--preset",
                       str(store.run_yaml.resolve()), "--executor", "slurm", "--resume-step", "latest"])


class ServersJob(submitit.helpers.Checkpointable):
    """The inference servers as a job of their own (``two_jobs``): one srun step
    serving until the stage's main job cancels this one. Requeued like the main job."""

    def __init__(self, run_yaml: str):
        self.run_yaml = str(run_yaml)

    def __call__(self) -> int:
        from deepscaler.prefetch import prepare_model

        cfg = load_config(self.run_yaml)
        # This job starts before the main job's supervisor, which prepares the model too: the
        # tiny one is built once, aside and renamed into place, whichever comes first.
        prepare_model(cfg)
        argv = job_steps(cfg, Path(self.run_yaml), None)["servers"]
        # The token the main job also reads (written at submit); in the environment only.
        token = read_token(RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).root)
        return subprocess.run(argv, check=False, env={**os.environ, TOKEN_ENV: token}).returncode


# --------------------------------------------------------------------------- the login node


def dry_run_script(cfg: Config, dependency: str | None = None) -> str:
    """The script(s) a submit would hand to sbatch (``--dry-run``), then the srun line of
    every job step the batch job will launch: what a cluster admin wants to read."""
    folder = job_folder(cfg).resolve()
    command = runner_command(folder)
    if layout(cfg) == "two_jobs":
        after = ",".join(x for x in (dependency, "after:<servers job>") if x)
        scripts = [stage_script(cfg, folder, command, dependency, servers=True),
                   stage_script(cfg, folder, command, after)]
    else:
        scripts = [stage_script(cfg, folder, command, dependency)]
    run_yaml = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).run_yaml.resolve()
    steps = [f"# job steps ({layout(cfg)}), started by the batch job"
             + (" (servers: by the servers job)" if layout(cfg) == "two_jobs" else "")]
    for name, argv in job_steps(cfg, run_yaml, None).items():
        steps += [f"# {name}", shlex.join(argv)]
    return "\n".join(scripts + steps) + "\n"


def submit_stages(configs: list[Config], resume: str | None, wait: bool = False) -> int:
    """Submit each stage as one job (two with ``two_jobs``), each after the previous stage
    succeeded (``afterok``).

    Everything that can be checked on the login node is checked before the first sbatch:
    the resume step, and that no chained stage would restart over existing checkpoints.
    Returns the exit code of the command.
    """
    from deepscaler.launch import write_run_yaml
    from deepscaler.stage import resolve_resume

    stores = [RunStore(c.run.output_dir, c.run.name, c.run.stage) for c in configs]
    try:
        for i, store in enumerate(stores):
            resolve_resume(store, resume if i == 0 else None)
            private_dir(job_folder(configs[i]))  # submitit's pickles: owner-only (docs/security.md)
        for store in stores:  # one token per stage and submit, for both of its jobs and their requeues
            write_token(store.root)
    except (ConfigError, TokenError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs, main_jobs, dependency = [], [], None  # every job (to cancel on error); one main job per stage
    # clean_env: submitting from inside a job must not leak its SLURM_* into the new one.
    # redirect_stderr: submitit prints sbatch's stderr itself; it goes into our one-line error.
    with submitit.helpers.clean_env(), contextlib.redirect_stderr(io.StringIO()):
        for i, (cfg, store) in enumerate(zip(configs, stores)):
            run_yaml = str(write_run_yaml(cfg, store).resolve())
            folder = job_folder(cfg).resolve()
            try:
                servers_job = None
                if layout(cfg) == "two_jobs":  # the main job starts once the servers' has
                    servers_job = executor(cfg, folder, [("inference server(s)", request(cfg, "inference"))], dependency,
                                           job_name(cfg, servers=True)).submit(ServersJob(run_yaml))
                    jobs.append(servers_job)
                    store.append_metrics({"source": "submit", "event": "submitted", "slurm_job_id": servers_job.job_id,
                                          "job_name": job_name(cfg, servers=True), "dependency": dependency})
                    dependency = ",".join(x for x in (dependency, f"after:{servers_job.job_id}") if x)
                job = executor(cfg, folder, main_job_requests(cfg), dependency).submit(
                    StageJob(run_yaml, resume if i == 0 else None, servers_job.job_id if servers_job else None))
            except Exception as e:  # submitit's FailedJobError carries sbatch's own message
                message = " ".join(str(e).split())
                print(f"error: sbatch refused stage {cfg.run.stage} of run '{cfg.run.name}': {message}",
                      file=sys.__stderr__)
                for earlier in jobs:
                    earlier.cancel(check=False)
                return 1
            store.append_metrics({"source": "submit", "event": "submitted", "slurm_job_id": job.job_id,
                                  "job_name": job_name(cfg), "dependency": dependency, "resume": resume if i == 0 else None})
            print(f"submitted stage {cfg.run.stage} of run '{cfg.run.name}': job {job.job_id} ({job_name(cfg)})"
                  f"{' after ' + dependency if dependency else ''}; logs in {folder}", flush=True)
            jobs.append(job)
            main_jobs.append(job)
            dependency = f"afterok:{job.job_id}"
    print("watch with: squeue -u $USER   or   python -m deepscaler.status --output-dir "
          f"{quote(configs[0].run.output_dir)} --run {quote(configs[0].run.name)}", flush=True)
    return wait_for(main_jobs, configs) if wait else 0


def wait_for(jobs: list, configs: list[Config], poll_s: float = 5.0) -> int:
    """Block until every job has ended, streaming the running stage's progress lines."""
    from deepscaler.progress import Display, MetricsTail

    for job, cfg in zip(jobs, configs):
        store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
        metrics = MetricsTail.from_end(store)
        last = {}

        with Display(cfg, stream=sys.stdout) as display:
            def show(states: dict[str, str]) -> None:
                state = states[job.job_id]
                if state != last.get("state"):
                    print(f"job {job.job_id} ({job_name(cfg)}): {state}", flush=True)
                    last["state"] = state
                display.update(metrics.poll())

            state = wait_for_jobs([job], show, poll_s)[job.job_id]
        if state != "COMPLETED":
            why = stage_error(job.paths.stderr, wait_s=LAST_WORDS_S)
            print(f"{why}\n" if why else "", end="", file=sys.stderr)
            print(f"error: job {job.job_id} ({job_name(cfg)}) ended {state}; its log: {job.paths.stderr}",
                  file=sys.stderr)
            return 1
    return 0


LAST_WORDS_S = 15.0  # sacct says CANCELLED at once; the job's supervisor says why moments later


def stage_error(log: Path, wait_s: float = 0.0) -> str | None:
    """The last ``error: `` or ``stopped: `` line of a stage job's log: why the stage failed (a
    dead server named, ...) or how it was stopped and resumes (:func:`stopped_line`), as the
    supervisor said it; waiting up to ``wait_s`` for one to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        said = next((x for x in reversed(lines) if x.startswith(("error: ", "stopped: "))), None)
        if said is not None or time.monotonic() >= deadline:
            return said
        time.sleep(0.5)

