"""A stage as one heterogeneous Slurm job, built on submitit.

Component 0 holds the inference servers, component 1 the trainer ranks and the orchestrator.
submitit has no heterogeneous-job support (facebookincubator/submitit#1741), so this module
extends its Slurm executor in two places and keeps the rest (the pickled callable, job
tracking, log files, ``job.result()``, requeue on timeout and preemption):

- the sbatch script is rendered here (:func:`render_script`), with one ``#SBATCH hetjob``
  block per component; the batch shell runs submitit's job runner, which calls
  :class:`StageJob`, the same supervisor as ``--executor local`` with every process started
  through ``srun --het-group=K``;
- sacct reports a hetjob's components as ``ID+0`` and ``ID+1`` while submitit looks up
  ``ID``: :class:`HetInfoWatcher` folds the component states into one
  (:func:`combine_states`).

The processes find each other through the run directory (``servers/<name>.addr``), and the
trainer ranks rendezvous at the first node of component 1 (``MASTER_ADDR``/``MASTER_PORT``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import shlex
import subprocess
from pathlib import Path
from typing import Iterable

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from deepscaler.config import load_config, server_names, ComponentResources, Config
from deepscaler.process import apply_process_settings
from deepscaler.slurm_time import time_minutes

# sacct states, most telling first: a failed component fails the job, a running one keeps it alive.
_FAILED = ("NODE_FAIL", "OUT_OF_MEMORY", "FAILED", "TIMEOUT", "CANCELLED", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
_ACTIVE = ("RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "PENDING")


def job_name(cfg: Config) -> str:
    """What ``squeue`` shows: ``deepscaler-<run>-s<K>``."""
    return f"deepscaler-{cfg.run.name}-s{cfg.run.stage}"


def combine_states(states: Iterable[str]) -> str:
    """One job state from the states of its components (sacct's ``ID+K`` lines).

    ``CANCELLED by 0`` counts as CANCELLED. A failure anywhere wins (the stage cannot go on
    without either side); then anything still active; COMPLETED only when every component is.
    """
    base = [s.split()[0] if s else "UNKNOWN" for s in states]
    for group in (_FAILED, _ACTIVE):
        for state in group:
            if state in base:
                return state
    if base and all(s == "COMPLETED" for s in base):
        return "COMPLETED"
    return base[0] if base else "UNKNOWN"


class HetInfoWatcher(SlurmInfoWatcher):
    """submitit's sacct reader, plus one entry ``ID`` per hetjob folded from ``ID+K``."""

    def read_info(self, string):
        info = super().read_info(string)
        components: dict[str, list[dict]] = {}
        for key, stats in info.items():
            m = re.fullmatch(r"(\d+)\+(\d+)", key)
            if m:
                components.setdefault(m.group(1), []).append(stats)
        for job_id, parts in components.items():
            info[job_id] = {**parts[0], "State": combine_states(p.get("State", "") for p in parts),
                            "NodeList": ",".join(p.get("NodeList", "") for p in parts)}
        return info


class HetJob(SlurmJob):
    watcher = HetInfoWatcher(delay_s=60)


# --------------------------------------------------------------------------- the script


def _quote(value: object) -> str:
    return shlex.quote(str(value))


def component_tasks(cfg: Config, component: str) -> int:
    """Tasks per node: one per server (inference), one per GPU rank (trainer), at least one."""
    res: ComponentResources = getattr(cfg.slurm, component)
    if component == "inference":
        return max(1, len(server_names(cfg)) // res.nodes)
    return max(1, res.gpus_per_node)


def cpus_per_task(cfg: Config, component: str) -> int:
    """CPUs of one task: ``cpus_per_gpu`` for each GPU it drives (a server drives
    ``tensor_parallel``), or ``cpus_per_gpu`` when the component has no GPUs."""
    res: ComponentResources = getattr(cfg.slurm, component)
    gpus = cfg.inference.tensor_parallel if component == "inference" else 1
    return res.cpus_per_gpu * (gpus if res.gpus_per_node else 1)


def _component_lines(cfg: Config, component: str) -> list[str]:
    res: ComponentResources = getattr(cfg.slurm, component)
    s = cfg.slurm
    lines = [f"--nodes={res.nodes}", f"--ntasks-per-node={component_tasks(cfg, component)}",
             f"--cpus-per-task={cpus_per_task(cfg, component)}", f"--time={s.time}"]
    if res.gpus_per_node:
        lines.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.mem:
        lines.append(f"--mem={res.mem}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value:
            lines.append(f"--{key}={_quote(value)}")
    return lines


def render_script(cfg: Config, folder: Path, command: str, dependency: str | None = None,
                  components: tuple[str, ...] = ("inference", "trainer"), name: str | None = None) -> str:
    """The sbatch script of one stage (also what ``--dry-run`` prints): one ``#SBATCH hetjob``
    block per component, or a single component for the two jobs of ``slurm.hetjob: false``."""
    s = cfg.slurm
    out = Path(folder)
    head = [
        f"--job-name={_quote(name or job_name(cfg))}",
        f"--output={_quote(out / '%j_0_log.out')}",
        f"--error={_quote(out / '%j_0_log.err')}",
        "--open-mode=append",
        # The batch shell (submitit's runner) gets USR2 before the limit, checkpoints the
        # supervisor and requeues the job; --requeue also lets Slurm requeue after a node failure.
        f"--signal=B:USR2@{s.signal_delay_s}",
        "--requeue",
    ]
    if dependency:
        head.append(f"--dependency={_quote(dependency)}")
    head += [line.strip() for line in s.extra_sbatch]
    what = {"inference": f"{len(server_names(cfg))} inference server(s)", "trainer": "trainer + orchestrator"}
    lines = ["#!/bin/bash", f"# {name or job_name(cfg)}: " + ", ".join(
        f"component {i} = {what[c]}" for i, c in enumerate(components))]
    for i, component in enumerate(components):
        if i:
            lines.append("#SBATCH hetjob")
        lines += [f"#SBATCH {x}" for x in (head if i == 0 else []) + _component_lines(cfg, component)]
    lines += ["", "# environment set-up (slurm.setup)"] + list(s.setup)
    lines += ["", "export SUBMITIT_EXECUTOR=slurm", f"exec {command}", ""]
    return "\n".join(lines)


class StageExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor with the hetjob script and state tracking of this module."""

    job_class = HetJob

    def __init__(self, folder: Path, cfg: Config, dependency: str | None = None,
                 components: tuple[str, ...] = ("inference", "trainer"), name: str | None = None):
        super().__init__(folder=folder, max_num_timeout=cfg.slurm.max_requeues)
        self.cfg, self.dependency, self.components, self.name = cfg, dependency, components, name
        self.parameters["time"] = time_minutes(cfg.slurm.time)  # submitit counts timeouts with it

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return render_script(self.cfg, self.folder, command, self.dependency, self.components, self.name)

    def _num_tasks(self) -> int:
        return 1  # submitit's runner is the supervisor: one task, in the batch shell


# --------------------------------------------------------------------------- inside the job


def job_steps(cfg: Config, run_yaml: Path, resume: str | None) -> dict[str, list[str]]:
    """The stage's processes as job steps: one step runs every server of component 0 (each
    task names itself ``server<SLURM_PROCID>``), one runs the trainer ranks of component 1, and
    the orchestrator shares the trainer's first node (``--overlap``; ``--mem=0`` because the
    trainer step holds the node's memory). Without hetjobs the servers are a job of their own
    (:class:`ServersJob`) and the other steps need no ``--het-group``.

    Every step says ``--cpus-per-task``: srun of Slurm 22.05-23.02 does not inherit it from
    sbatch, and a task would get one CPU. GPUs (docs/cluster.md, "GPU binding"): each server
    task is bound to its own ``tensor_parallel`` GPUs (``--gpus-per-task``), so vLLM sees them
    as cuda:0..TP-1; the trainer's tasks share the node's trainer GPUs (``--gpus-per-node``,
    ``--gpu-bind=none``) and each rank takes the one at its local rank, so the ranks can
    reach each other's GPUs for NCCL's peer-to-peer transfers where a cluster constrains
    devices per task."""
    inf, tr = cfg.slurm.inference, cfg.slurm.trainer
    py, config = sys.executable, ["--config", str(run_yaml)]
    resume_args = ["--resume-step", resume] if resume is not None else []
    step = ["srun", "--unbuffered", "--kill-on-bad-exit=1"]
    group = (lambda k: [f"--het-group={k}"]) if cfg.slurm.hetjob else (lambda k: [])
    server_gpus = [f"--gpus-per-task={cfg.inference.tensor_parallel}"] if inf.gpus_per_node else []
    trainer_gpus = [f"--gpus-per-node={tr.gpus_per_node}", "--gpu-bind=none"] if tr.gpus_per_node else []
    commands = {
        "servers": [*step, *group(0), f"--nodes={inf.nodes}", f"--ntasks={len(server_names(cfg))}",
                    f"--cpus-per-task={cpus_per_task(cfg, 'inference')}", *server_gpus,
                    py, "-m", "deepscaler.inference", *config, "--name", "server{rank}"],
        "trainer": [*step, *group(1), f"--nodes={tr.nodes}", f"--ntasks-per-node={component_tasks(cfg, 'trainer')}",
                    f"--cpus-per-task={cpus_per_task(cfg, 'trainer')}", *trainer_gpus,
                    py, "-m", "deepscaler.trainer", *config, *resume_args],
        "orchestrator": [*step, *group(1), "--nodes=1", "--ntasks=1", f"--cpus-per-task={cpus_per_task(cfg, 'trainer')}",
                         "--overlap", "--mem=0", py, "-m", "deepscaler.orchestrator", *config, *resume_args],
    }
    return commands


def job_commands(cfg: Config, run_yaml: Path, resume: str | None) -> dict[str, list[str]]:
    """What the stage's supervisor starts: every step, less the servers when they are a job of
    their own (``slurm.hetjob: false``)."""
    steps = job_steps(cfg, run_yaml, resume)
    if not cfg.slurm.hetjob:
        del steps["servers"]
    return steps


def first_node_address(nodelist: str) -> str:
    """The address of the first node of a Slurm node list (``gpu[01-04]`` -> gpu01's NodeAddr).

    NodeAddr, not the node name: names need not resolve (the local cluster's node2 is
    127.0.0.1), and NodeAddr is what Slurm itself uses to reach the node."""
    names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    first = names.stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True)
    m = re.search(r"\bNodeAddr=(\S+)", node.stdout)
    return m.group(1) if m else first


class StageJob(submitit.helpers.Checkpointable):
    """What the job runs: the stage supervisor (``deepscaler.launch.run_stage``) with every
    process placed by ``srun``. Checkpointable: at the time limit or on preemption submitit
    calls :meth:`checkpoint` and requeues; the next attempt resumes from the newest stable
    checkpoint, as does an attempt that Slurm requeued by itself (node failure)."""

    def __init__(self, run_yaml: str, resume: str | None = None, servers_job: str | None = None):
        self.run_yaml = str(run_yaml)
        self.resume = resume
        self.servers_job = servers_job  # slurm.hetjob false: the job that runs the servers

    def __call__(self) -> str:
        from deepscaler.launch import run_stage

        cfg = load_config(self.run_yaml)
        apply_process_settings(cfg)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        resume = "latest" if restarts else self.resume
        nodes = os.environ.get("SLURM_JOB_NODELIST_HET_GROUP_1") or os.environ.get("SLURM_JOB_NODELIST", "")
        job_id = os.environ.get("SLURM_JOB_ID", "0")
        env = {"MASTER_ADDR": first_node_address(nodes) if nodes else "127.0.0.1",
               "MASTER_PORT": str(20000 + int(job_id) % 20000)}
        print(f"attempt {restarts + 1} of job {job_id}: resume {resume or 'no (fresh start)'}", flush=True)
        store = run_stage(cfg, resume, commands=job_commands, extra_env=env,
                          event={"slurm_job_id": job_id, "restart_count": restarts})
        if self.servers_job:  # the stage is done: its servers' job ends with it
            subprocess.run(["scancel", self.servers_job], check=False)
        return str(store.root)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(StageJob(self.run_yaml, "latest", self.servers_job))


class ServersJob(submitit.helpers.Checkpointable):
    """The inference servers as a job of their own (``slurm.hetjob: false``): one srun step
    serving until the stage's main job cancels this one. Requeued like the main job."""

    def __init__(self, run_yaml: str):
        self.run_yaml = str(run_yaml)

    def __call__(self) -> int:
        argv = job_steps(load_config(self.run_yaml), Path(self.run_yaml), None)["servers"]
        return subprocess.run(argv, check=False).returncode


# --------------------------------------------------------------------------- the login node


def job_folder(cfg: Config) -> Path:
    """submitit's folder of a stage (pickles, the sbatch script, the runner's logs)."""
    from deepscaler.store import RunStore

    return RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).logs_dir / "slurm"


def _runner_command(folder: Path) -> str:
    import sys

    return f"{_quote(sys.executable)} -u -m submitit.core._submit {_quote(folder)}"


def dry_run_script(cfg: Config, dependency: str | None = None) -> str:
    """The script(s) a submit would hand to sbatch (``--dry-run``), then the srun line of
    every job step the batch job will launch: what a cluster admin wants to read."""
    from deepscaler.store import RunStore

    folder = job_folder(cfg).resolve()
    command = _runner_command(folder)
    if cfg.slurm.hetjob:
        scripts = [render_script(cfg, folder, command, dependency)]
    else:
        after = ",".join(x for x in (dependency, "after:<servers job>") if x)
        scripts = [render_script(cfg, folder, command, dependency, ("inference",), f"{job_name(cfg)}-inference"),
                   render_script(cfg, folder, command, after, ("trainer",))]
    run_yaml = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage).run_yaml.resolve()
    steps = ["# job steps, started by the batch job" + ("" if cfg.slurm.hetjob else " (servers: by the servers job)")]
    for name, argv in job_steps(cfg, run_yaml, None).items():
        steps += [f"# {name}", shlex.join(argv)]
    return "\n".join(scripts + steps) + "\n"


def submit_stages(configs: list[Config], resume: str | None, wait: bool = False) -> int:
    """Submit each stage as one hetjob, each after the previous one succeeded (``afterok``).

    Everything that can be checked on the login node is checked before the first sbatch:
    the resume step, and that no chained stage would restart over existing checkpoints.
    Returns the exit code of the command.
    """
    import sys

    from deepscaler.config import ConfigError
    from deepscaler.launch import write_run_yaml
    from deepscaler.stage import resolve_resume
    from deepscaler.store import RunStore

    stores = [RunStore(c.run.output_dir, c.run.name, c.run.stage) for c in configs]
    try:
        for i, store in enumerate(stores):
            resolve_resume(store, resume if i == 0 else None)
    except ConfigError as e:
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
                if not cfg.slurm.hetjob:  # two ordinary jobs: the main one starts once the servers' has
                    servers_job = StageExecutor(folder, cfg, dependency, ("inference",),
                                                f"{job_name(cfg)}-inference").submit(ServersJob(run_yaml))
                    jobs.append(servers_job)
                    store.append_metrics({"source": "submit", "event": "submitted", "slurm_job_id": servers_job.job_id,
                                          "job_name": f"{job_name(cfg)}-inference", "dependency": dependency})
                    dependency = ",".join(x for x in (dependency, f"after:{servers_job.job_id}") if x)
                components = ("inference", "trainer") if cfg.slurm.hetjob else ("trainer",)
                job = StageExecutor(folder, cfg, dependency, components).submit(
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
          f"{_quote(configs[0].run.output_dir)} --run {_quote(configs[0].run.name)}", flush=True)
    return wait_for(main_jobs, configs) if wait else 0


def wait_for(jobs: list, configs: list[Config], poll_s: float = 5.0) -> int:
    """Block until every job has ended, streaming the running stage's progress lines."""
    import sys
    import time

    from deepscaler.progress import Display, MetricsTail
    from deepscaler.store import RunStore

    for job, cfg in zip(jobs, configs):
        store = RunStore(cfg.run.output_dir, cfg.run.name, cfg.run.stage)
        metrics = MetricsTail.from_end(store)
        last_state = None
        with Display(cfg, stream=sys.stdout) as display:
            while True:
                state = job.watcher.get_state(job.job_id, mode="force")
                if state != last_state:
                    print(f"job {job.job_id} ({job_name(cfg)}): {state}", flush=True)
                    last_state = state
                display.update(metrics.poll())
                if state in ("COMPLETED", *_FAILED) and state != "PREEMPTED":
                    break
                time.sleep(poll_s)
        if state != "COMPLETED":
            print(f"error: job {job.job_id} ({job_name(cfg)}) ended {state}; its log: {job.paths.stderr}",
                  file=sys.stderr)
            return 1
    return 0
