"""One run per stage directory (deepscaler/run_lock.py): who holds the lock, and when another
supervisor may take it over. A second process is a real one; another host and another Slurm
job are simulated by the holder file they would write."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from deepscaler import run_lock
from deepscaler.run_lock import Holder, RunLock, RunLocked, live_holder
from deepscaler.store import RunStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path, "run", 1)


def plant(store: RunStore, **holder) -> None:
    """A lock as another supervisor left it."""
    d = run_lock.lock_dir(store)
    d.mkdir(parents=True)
    (d / run_lock.HOLDER).write_text(json.dumps({"since": time.time(), **holder}))


# --------------------------------------------------------------------------- real Slurm jobs
# A holder's Slurm job is asked of the real squeue (the local cluster, as in CI): one job
# runs for the whole module, one has ended. Their state is read here with a squeue call of
# the test's own, so a broken query in run_lock cannot also break the test's waiting.

def _sbatch(*args: str) -> str:
    from tests.slurm_cluster import slurm_env

    return subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args], capture_output=True, text=True,
                          timeout=15, check=True, env=slurm_env()).stdout.strip().split(";")[0]


def _scancel(job: str) -> None:
    from tests.slurm_cluster import slurm_env

    subprocess.run(["scancel", job], capture_output=True, timeout=15, env=slurm_env())


def squeue_state(job: str) -> str:
    """The job's state, "" once Slurm has forgotten it (an ended job)."""
    from tests.slurm_cluster import slurm_env

    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=15,
                          env=slurm_env()).stdout.strip()


def wait_state(job: str, state: str) -> None:
    for _ in range(600):
        if squeue_state(job) == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"Slurm job {job} is {squeue_state(job)!r}, not {state!r}, after 60 s")


@pytest.fixture(scope="module")
def live_job(slurm_cluster) -> str:
    """A real job that runs while the module's tests do; cancelled at the end."""
    job = _sbatch("--job-name", "lock-test-live", "--wrap", "sleep 300")
    try:
        wait_state(job, "RUNNING")
        yield job
    finally:
        _scancel(job)


@pytest.fixture(scope="module")
def ended_job(slurm_cluster) -> str:
    """A real job that ran and has ended."""
    job = _sbatch("--job-name", "lock-test-ended", "--wrap", "true")
    try:
        wait_state(job, "")
    except AssertionError:
        _scancel(job)
        raise
    return job


def test_a_held_lock_names_its_holder_and_is_released(store):
    with RunLock(store):
        found = run_lock.holder(store)
        assert found is not None and found[0].pid == os.getpid()
        elsewhere = Holder("another-host", 1, None, time.time())  # a supervisor on another node
        held_by = live_holder(store, elsewhere)
        assert held_by is not None and held_by.pid == os.getpid()
        message = str(run_lock.refusal(store, held_by))
        assert "\n" not in message and f"pid {os.getpid()} on {Holder.me().host}" in message
    assert not run_lock.lock_dir(store).exists()


@contextlib.contextmanager
def held_elsewhere(store, attempt: str | None = None):
    """Another process holding the stage's lock (as a supervisor does) until the block ends;
    yields that process."""
    code = ("import sys, time\nfrom deepscaler.run_lock import RunLock\nfrom deepscaler.store import RunStore\n"
            f"with RunLock(RunStore({str(store.output_dir)!r}, 'run', 1), {attempt!r}):\n"
            "    print('held', flush=True)\n    time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_process_is_refused_while_the_first_holds_the_lock(store):
    with held_elsewhere(store) as holder:
        with pytest.raises(RunLocked) as err:
            RunLock(store).acquire()
        assert f"pid {holder.pid}" in str(err.value) and "is in use by another run of this stage" in str(err.value)
    with RunLock(store):  # its pid is gone: taken over at once
        assert run_lock.holder(store)[0].pid == os.getpid()


@pytest.mark.parametrize("case", [pytest.param("same job", marks=pytest.mark.slurm), "dead pid", "stale"])
def test_a_lock_is_taken_over_when_its_holder_is_gone(store, monkeypatch, request, case):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    if case == "same job":  # a requeued attempt of the job that took it, on another node; the job runs
        job = request.getfixturevalue("live_job")
        monkeypatch.setenv("SLURM_JOB_ID", job)
        plant(store, host="node7", pid=1, job_id=job)
    elif case == "dead pid":
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        plant(store, host=Holder.me().host, pid=int(done.stdout), job_id=None)
    else:  # a lost node outside Slurm (a holder whose job runs keeps the lock: see the Slurm test below)
        plant(store, host="node7", pid=1, job_id=None)
        old = time.time() - run_lock.STALE_S - 5
        os.utime(run_lock.lock_dir(store) / run_lock.HOLDER, (old, old))
    with RunLock(store):
        assert run_lock.holder(store)[0].pid == os.getpid()


@pytest.mark.slurm
def test_a_live_holder_on_another_node_keeps_the_lock(store, monkeypatch, live_job, ended_job):
    """The holder's job is a real one: the real squeue says whether it runs."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    plant(store, host="node7", pid=1, job_id=live_job)
    with pytest.raises(RunLocked) as err:
        RunLock(store).acquire()
    assert f"pid 1 on node7, Slurm job {live_job}" in str(err.value)
    assert run_lock.holder(store)[0].job_id == live_job  # nothing was moved aside
    remove_lock(store)
    plant(store, host="node7", pid=1, job_id=ended_job)  # its job has ended
    with RunLock(store):
        assert run_lock.holder(store)[0].pid == os.getpid()


@pytest.mark.slurm
def test_job_running_asks_the_real_squeue(live_job, ended_job):
    """Real counterpart of test_a_completing_job_no_longer_holds_the_lock: a running, a
    suspended, a pending (held), an ended and an unknown job, as the local Slurm says them."""
    assert run_lock._job_running(live_job) is True
    held = _sbatch("--hold", "--job-name", "lock-test-held", "--wrap", "sleep 300")
    try:
        wait_state(held, "PENDING")
        assert run_lock._job_running(held) is False  # a requeued job waits so: none of it runs
    finally:
        _scancel(held)
    assert run_lock._job_running(ended_job) is False
    assert run_lock._job_running(str(int(live_job) + 10**6)) is False  # Slurm never had it
    from tests.slurm_cluster import slurm_env

    suspend = subprocess.run(["scontrol", "suspend", live_job], capture_output=True, text=True, timeout=15,
                             env=slurm_env())
    if suspend.returncode != 0:  # suspending needs a Slurm operator; not one here
        return
    try:
        wait_state(live_job, "SUSPENDED")
        assert run_lock._job_running(live_job) is True  # a suspended job's processes resume: it keeps the lock
    finally:
        subprocess.run(["scontrol", "resume", live_job], capture_output=True, timeout=15, env=slurm_env())
    wait_state(live_job, "RUNNING")


def remove_lock(store: RunStore) -> None:
    import shutil

    shutil.rmtree(run_lock.lock_dir(store))


def test_a_lock_being_made_counts_as_held(store):
    run_lock.lock_dir(store).mkdir(parents=True)  # its holder file is not written yet
    with pytest.raises(RunLocked):
        RunLock(store).acquire()


def test_a_process_started_by_hand_beside_a_running_supervisor_is_refused(store, monkeypatch):
    """The supervisor's children carry its attempt id (as deepscaler.launch starts them); a
    trainer or orchestrator started by hand on the live stage does not, and is refused."""
    from deepscaler.handover import ATTEMPT_ENV
    from deepscaler.run_lock import refuse_outsider

    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    refuse_outsider(store)  # no supervisor: a process by hand may run
    with held_elsewhere(store, "attempt-7") as holder:
        monkeypatch.setenv(ATTEMPT_ENV, "attempt-7")
        refuse_outsider(store)  # the supervisor's own child
        for env in ("attempt-6", None):
            if env is None:
                monkeypatch.delenv(ATTEMPT_ENV)
            else:
                monkeypatch.setenv(ATTEMPT_ENV, env)
            with pytest.raises(RunLocked, match=rf"in use by another run of this stage \(pid {holder.pid} on "):
                refuse_outsider(store)


@pytest.mark.parametrize("state, running", [("RUNNING", True), ("SUSPENDED", True), ("COMPLETING", False),
                                            ("PENDING", False)])
def test_a_completing_job_no_longer_holds_the_lock(monkeypatch, state, running):
    """Right after scancel the job is COMPLETING while Slurm kills its processes: a resubmit
    then must not be refused (it was, in CI). squeue's answer is canned for speed and for
    COMPLETING, which a real job is in only while Slurm kills it (how long is not ours to set); real counterparts:
    tests/unit/test_run_lock.py::test_job_running_asks_the_real_squeue and
    tests/unit/test_run_lock.py::test_a_running_slurm_job_keeps_the_lock_whatever_its_heartbeat."""
    monkeypatch.setattr(run_lock.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=f"{state}\n", stderr=""))
    assert run_lock._job_running("21") is running


# --------------------------------------------------------------------------- nothing of the old run can still write
# A lock is taken over only when no process of the run that holds it is left: a stopped
# supervisor (Ctrl-Z) or its children, which live on in their own sessions, keep it whatever
# the heartbeat says. Timeouts are the config keys' (run.lock_stale_s, run.lock_heartbeat_s),
# in seconds here.

STALE, BEAT = 1.0, 0.2


@contextlib.contextmanager
def supervisor(store, attempt: str = "attempt-A", child_argv: tuple[str, ...] = ()):
    """A process holding the stage's lock as a supervisor does (heartbeat BEAT), with one child
    that carries its attempt id, in a session of its own (as deepscaler.launch starts them).
    Yields (supervisor, child pid); both are killed at the end."""
    code = ("import os, subprocess, sys, time\nfrom deepscaler.run_lock import RunLock\n"
            "from deepscaler.store import RunStore\n"
            f"store = RunStore({str(store.output_dir)!r}, {store.run!r}, {store.stage})\n"
            f"with RunLock(store, {attempt!r}, heartbeat_s={BEAT}, stale_s={STALE}):\n"
            f"    env = {{**os.environ, 'DEEPSCALER_ATTEMPT': {attempt!r}}}\n"
            "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', *sys.argv[1:]],\n"
            "                             env=env, start_new_session=True)\n"
            "    print(child.pid, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, *child_argv], stdout=subprocess.PIPE, text=True, cwd=REPO)
    child = int(proc.stdout.readline())
    try:
        yield proc, child
    finally:
        for pid in (child, proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        wait_gone(child)


def wait_gone(pid: int) -> None:
    """Until ``pid`` has ended (gone, or a zombie: it is not ours to reap)."""
    for _ in range(200):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat[stat.rfind(")") + 2:].startswith("Z"):
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not end")


def stale(store) -> None:
    """Wait until the holder's heartbeat is older than STALE."""
    time.sleep(STALE + 2 * BEAT)
    assert run_lock.holder(store)[1] > STALE


def test_a_stopped_supervisor_keeps_its_lock_past_the_stale_time(store):
    with supervisor(store) as (proc, child):
        os.kill(proc.pid, signal.SIGSTOP)  # Ctrl-Z: its heartbeat stops, its child runs on
        try:
            stale(store)
            with pytest.raises(RunLocked) as err:
                RunLock(store, "attempt-B", stale_s=STALE).acquire()
            message = str(err.value)
            assert "\n" not in message and f"(pid {proc.pid} on {Holder.me().host}" in message
            assert f"stopped (Ctrl-Z or SIGSTOP: continue it with fg or kill -CONT {proc.pid})" in message
            assert f"its processes are alive: python" in message and f"pid {child}" in message
            assert run_lock.holder(store)[0].attempt == "attempt-A"  # nothing was moved aside
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(2 * BEAT)
        assert run_lock.holder(store)[1] < STALE  # it beats again, still the holder
    with RunLock(store, "attempt-B", stale_s=STALE):  # all of it gone: taken over at once
        assert run_lock.holder(store)[0].attempt == "attempt-B"


def test_the_children_of_a_killed_supervisor_keep_its_lock(store):
    with supervisor(store, child_argv=("-m", "deepscaler.trainer")) as (proc, child):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with pytest.raises(RunLocked, match=rf"pid {proc.pid} on .*; its processes are alive: trainer pid {child}\)"):
            RunLock(store, "attempt-B", stale_s=STALE).acquire()
        os.kill(child, signal.SIGKILL)
        wait_gone(child)
        with RunLock(store, "attempt-B", stale_s=STALE):
            pass


def stage_process(store, attempt: str | None, config: str) -> subprocess.Popen:
    """A process as the stage's trainer is started (``--config`` relative to its cwd), carrying
    ``attempt`` (None: none, as a process started by hand or an editor has)."""
    env = {k: v for k, v in os.environ.items() if k != "DEEPSCALER_ATTEMPT"}
    if attempt:
        env["DEEPSCALER_ATTEMPT"] = attempt
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "deepscaler.trainer",
                             "--config", config], env=env, cwd=store.output_dir)


def test_a_stage_whose_lock_was_removed_is_in_use_while_its_processes_run(store):
    """LOCK/ removed by hand mid-run: the run's processes are found by their attempt id and
    this stage's run.yaml on their command line, or by an attempt that handover/ names."""
    from deepscaler.handover import Progress
    from deepscaler.store import atomic_write_json

    store.ensure_dirs()
    store.run_yaml.write_text("run: {}\n")
    other = RunStore(store.output_dir, "run", 2)
    other.ensure_dirs()
    other.run_yaml.write_text("run: {}\n")
    rel = str(store.run_yaml.relative_to(store.output_dir))
    harmless = [stage_process(store, None, rel),  # names the run.yaml, but no supervisor started it
                stage_process(store, "attempt-C", str(other.run_yaml))]  # another stage's
    try:
        with RunLock(store, "attempt-B", stale_s=STALE):
            pass
        trainer = stage_process(store, "attempt-A", rel)
        time.sleep(0.3)  # its command line is in /proc once it runs
        try:
            with pytest.raises(RunLocked) as err:
                RunLock(store, "attempt-B", stale_s=STALE).acquire()
            assert "\n" not in str(err.value)
            assert f"(its LOCK/ is gone (removed by hand?); its processes are alive: trainer pid {trainer.pid})" \
                in str(err.value)
        finally:
            trainer.kill()
            trainer.wait()
        with RunLock(store, "attempt-B", stale_s=STALE):
            pass
        # A process of the run that names no run.yaml (a worker of the orchestrator's pool) is
        # known by the attempt the run's hand-over report names.
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  env={**os.environ, "DEEPSCALER_ATTEMPT": "attempt-A"})
        atomic_write_json(store.handover_dir / "orchestrator.json",
                          asdict(Progress("orchestrator", 3, "running", Holder.me().host, 1, "attempt-A", time.time())))
        time.sleep(0.3)
        try:
            with pytest.raises(RunLocked, match=rf"its processes are alive: python\S* pid {worker.pid}\)"):
                RunLock(store, "attempt-B", stale_s=STALE).acquire()
        finally:
            worker.kill()
            worker.wait()
    finally:
        for p in harmless:
            p.kill()
            p.wait()


def report(store, role: str, host: str, age: float, job_id: str | None = None) -> None:
    """The hand-over report a trainer or orchestrator of attempt-A on ``host`` last wrote ``age`` s ago."""
    from deepscaler.handover import Progress
    from deepscaler.store import atomic_write_json

    atomic_write_json(store.handover_dir / f"{role}.json",
                      asdict(Progress(role, 2, "running", host, 4242, "attempt-A", time.time() - age, job_id)))


def test_a_stopped_supervisor_on_another_host_keeps_its_lock_while_its_children_report(store):
    """Outside Slurm, from another host, a lock with a stale heartbeat is taken over only when
    the hand-over reports of its trainer and orchestrator are stale too."""
    plant(store, host="node7", pid=1, job_id=None, attempt="attempt-A")
    old = time.time() - 10 * STALE
    os.utime(run_lock.lock_dir(store) / run_lock.HOLDER, (old, old))
    report(store, "trainer", "node7", age=0.0)  # its child still reports
    with pytest.raises(RunLocked, match=r"pid 1 on node7, since .*; its processes are alive: trainer pid 4242 on "):
        RunLock(store, stale_s=STALE).acquire()
    report(store, "trainer", "node7", age=1000)  # a lost node: nothing reports (reports beat every 10 s)
    with RunLock(store, stale_s=STALE):
        pass


def test_a_child_stops_before_writing_once_its_run_no_longer_holds_the_lock(store, monkeypatch):
    import shutil

    from deepscaler.handover import ATTEMPT_ENV
    from deepscaler.run_lock import LockLost, require_ownership

    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    require_ownership(store)  # started by hand, no supervisor: there is no lock to own
    monkeypatch.setenv(ATTEMPT_ENV, "attempt-A")
    lock = RunLock(store, "attempt-A", heartbeat_s=0.05, stale_s=STALE)
    with lock:
        require_ownership(store)  # its own supervisor's lock
        shutil.rmtree(run_lock.lock_dir(store))  # removed by hand
        with pytest.raises(LockLost) as err:
            require_ownership(store)
        assert str(err.value) == (f"{store.root}: this run (attempt attempt-A) no longer holds the stage's lock: "
                                  f"{run_lock.lock_dir(store)} is gone (removed by hand?); stopped before writing "
                                  "again (resume with --resume-step latest once no other run uses the stage)")
        time.sleep(0.3)
        assert not run_lock.lock_dir(store).exists()  # the heartbeat does not make it again
        with RunLock(store, "attempt-B", stale_s=STALE) as taken:  # another run takes the free stage
            time.sleep(0.3)
            assert run_lock.holder(store)[0].attempt == "attempt-B"  # the old heartbeat left it alone
            with pytest.raises(LockLost, match=r"no longer holds the stage's lock: it is now held by pid "):
                require_ownership(store)
            lock.release()  # the old run's end does not release the new run's lock
            assert run_lock.holder(store)[0] == taken.me


def test_a_second_run_of_a_live_stage_is_refused_before_it_builds_anything(tmp_path):
    """run_stage takes the lock first: a refused second run has not built or written anything
    (it built the tiny model for a minute before)."""
    from deepscaler.config import load_config
    from deepscaler.launch import run_stage

    cfg = load_config([REPO / "yaml/stage1.yaml", REPO / "yaml/tiny-random.yaml"], [f"run.output_dir={tmp_path}"])
    store = RunStore(tmp_path, "tiny", 1)

    def commands(*args):
        raise AssertionError("a process was started")

    with supervisor(store) as (proc, _):
        with pytest.raises(RunLocked, match=rf"in use by another run of this stage \(pid {proc.pid} on "):
            run_stage(cfg, commands=commands)
    assert not (tmp_path / "cache").exists()  # the tiny model was not built
    assert not store.run_yaml.exists()


@pytest.mark.slurm
def test_a_running_slurm_job_keeps_the_lock_whatever_its_heartbeat(store, slurm_cluster):
    """A holder's Slurm job that runs (or is suspended) holds the lock, however old the
    heartbeat (a stopped supervisor in a running job); right after scancel (the job is
    COMPLETING while Slurm kills its processes) it is taken over. The job is this test's own,
    since it cancels it."""
    import shutil

    job = _sbatch("--job-name", "lock-test-cancelled", "--wrap", "sleep 120")
    try:
        wait_state(job, "RUNNING")
        plant(store, host="node7", pid=1, job_id=job)
        old = time.time() - 10 * STALE
        os.utime(run_lock.lock_dir(store) / run_lock.HOLDER, (old, old))
        with pytest.raises(RunLocked, match=rf"pid 1 on node7, Slurm job {job}, since"):
            RunLock(store, stale_s=STALE).acquire()
        # LOCK/ removed by hand: the job's trainer on another node, however old its report, holds the stage
        shutil.rmtree(run_lock.lock_dir(store))
        report(store, "trainer", "node7", age=1000, job_id=job)
        with pytest.raises(RunLocked, match=r"its LOCK/ is gone .*; its processes are alive: trainer pid 4242 on "):
            RunLock(store, stale_s=STALE).acquire()
        plant(store, host="node7", pid=1, job_id=job)
        os.utime(run_lock.lock_dir(store) / run_lock.HOLDER, (old, old))
    finally:
        _scancel(job)
    assert squeue_state(job) in ("COMPLETING", "CANCELLED", "")  # no wait: a resubmit comes at once
    with RunLock(store, stale_s=STALE):
        assert run_lock.holder(store)[0].pid == os.getpid()
