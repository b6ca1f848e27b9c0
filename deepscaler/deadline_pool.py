"""A process pool whose every item runs under a hard deadline.

Why not ``concurrent.futures``: a Python-level timeout cannot stop C code (big-integer
arithmetic inside sympy can hold a core for minutes), and a thread cannot use SIGALRM. So
each item runs in a long-lived worker process, and a worker whose current item overruns its
deadline is SIGKILLed: the item gets the ``failure`` result, a fresh worker takes over the
rest of its chunk. A worker that dies by itself is replaced the same way; the item it was on
is retried once, then gets ``failure``. The reward (``deepscaler/reward.py``) is the user.

Workers come from multiprocessing's "forkserver" (safe in a process that has threads; the
server preloads the module of the item function, so a replacement starts in milliseconds).
Use the pool as a context manager, or call ``close()``: afterwards no worker process is left.
Concurrent ``run`` calls are served one at a time.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger("deepscaler.deadline_pool")


@dataclass
class PoolStats:
    """Counters since the pool was built, for the caller's logs."""

    items: int = 0  # items run by a worker
    timeouts: int = 0  # items killed at their deadline
    crashes: int = 0  # worker deaths the pool did not cause (the item in flight is retried once)
    respawns: int = 0  # workers started to replace a killed or dead one
    max_item_s: float = 0.0  # slowest item seen by a worker (start to result or kill)


@dataclass
class _Item:
    index: int
    args: tuple
    attempt: int = 0


def _worker_main(conn: multiprocessing.connection.Connection, fn: Callable, warmup: Callable | None,
                 failure: Any) -> None:
    """Receive a chunk [(index, args)], send (index, fn(*args)) per item: one message per
    finished item tells the parent when each item started, so it can hold each to its deadline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if warmup is not None:
        warmup()
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, args in chunk:
            try:
                result = fn(*args)
            except Exception:  # noqa: BLE001 - an item that raises gets the failure result
                result = failure
            conn.send((index, result))


class _Worker:
    __slots__ = ("proc", "conn", "inflight", "started")

    def __init__(self, ctx: Any, target_args: tuple, name: str) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, *target_args), name=name, daemon=True)
        self.proc.start()
        child_conn.close()
        self.conn = parent_conn
        self.inflight: deque[_Item] = deque()
        self.started = 0.0

    def stop(self, *, force: bool) -> None:
        if not force and self.proc.is_alive():
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            self.proc.join(timeout=1.0)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5.0)
        self.conn.close()
        self.proc.close()


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        w = workers.pop()
        try:
            w.stop(force=False)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


class DeadlinePool:
    """``run(items)`` returns ``[fn(*args) for args in items]``, each under ``deadline_s``.

    ``fn`` and ``warmup`` must be module-level functions (workers import them by name);
    ``failure`` is the result of an item that times out, raises or crashes its worker twice.
    """

    def __init__(self, fn: Callable, workers: int, deadline_s: float, *, failure: Any = None,
                 warmup: Callable | None = None, chunk_size: int | None = None, name: str = "deepscaler-pool") -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.num_workers = int(workers)
        self.deadline_s = float(deadline_s)
        self.chunk_size = chunk_size
        self.failure = failure
        self.stats = PoolStats()
        self._target_args = (fn, warmup, failure)
        self._name = name
        self._ctx = multiprocessing.get_context("forkserver")
        # The forkserver imports these once and every worker is a fork of it: no per-worker
        # imports, and no re-import of the caller's main module (multiprocessing's default
        # preload, kept). Only takes effect if this interpreter's forkserver is not running yet.
        self._ctx.set_forkserver_preload(["__main__", __name__, fn.__module__])
        self._workers: list[_Worker] = []
        self._closed = False
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        for _ in range(self.num_workers):
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self._target_args, self._name)

    # -- lifecycle

    def __enter__(self) -> "DeadlinePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (politely, then SIGKILL) and wait for them."""
        self._closed = True
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        """The current workers' process ids (they change when a worker is replaced)."""
        return [w.proc.pid for w in self._workers]

    # -- running

    def run(self, items: Sequence[tuple[int, tuple]], size: int) -> list[Any]:
        """Results of ``items`` ``[(index, args)]`` in a list of ``size`` (other indices keep
        ``failure``), each item under the deadline."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        results = [self.failure] * size
        pending = deque(_Item(index, tuple(args)) for index, args in items)
        with self._lock:
            self.stats.items += len(pending)
            if pending:
                try:
                    self._run(pending, results)
                except BaseException:
                    # Interrupted (Ctrl-C, a bug): results of this batch may still be in the
                    # pipes, and must not land in the next batch. Start over with fresh workers.
                    for i, w in enumerate(self._workers):
                        if w.inflight:
                            self._replace(i, w)
                    raise
        return results

    def _chunk(self, total: int) -> int:
        if self.chunk_size:
            return max(1, int(self.chunk_size))
        # Small, so that few items wait behind a slow one (a chunk is not stolen back) and the
        # workers finish together; at ~5 ms per item, 8 items still amortise a send.
        return max(1, min(8, math.ceil(total / (self.num_workers * 8))))

    def _run(self, pending: deque[_Item], results: list) -> None:
        chunk = self._chunk(len(pending))
        outstanding = len(pending)
        while outstanding:
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if not w.inflight and pending:
                    if not w.proc.is_alive():  # died while idle: replace it, lose nothing
                        w = self._replace(i, w)
                    items = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    w.inflight.extend(items)
                    w.started = now
                    try:
                        w.conn.send([(it.index, it.args) for it in items])
                    except (OSError, ValueError):
                        pass  # its sentinel reports the death below
            busy = [w for w in self._workers if w.inflight]
            wait_s = max(0.0, min(w.started for w in busy) + self.deadline_s - now)
            handles: list[Any] = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            ready = set(multiprocessing.connection.wait(handles, timeout=wait_s))
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    outstanding -= self._drain(w, results)
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if not w.inflight:
                    continue
                if w.proc.sentinel in ready or not w.proc.is_alive():
                    outstanding -= self._drain(w, results)  # what it sent before dying
                    if w.inflight:
                        outstanding -= self._fail(i, w, results, pending, timed_out=False)
                elif now - w.started >= self.deadline_s:
                    finished = self._drain(w, results)  # a result may have just arrived
                    outstanding -= finished
                    if not finished and w.inflight:
                        outstanding -= self._fail(i, w, results, pending, timed_out=True)

    def _drain(self, w: _Worker, results: list) -> int:
        """Take every result the worker has sent; return how many items finished."""
        done = 0
        try:
            while w.inflight and w.conn.poll():
                index, result = w.conn.recv()
                item = w.inflight.popleft()
                if item.index != index:  # cannot happen: a worker answers in order
                    raise RuntimeError(f"{self._name} worker answered item {index}, expected {item.index}")
                results[index] = result
                now = time.monotonic()
                self.stats.max_item_s = max(self.stats.max_item_s, now - w.started)
                w.started = now
                done += 1
        except (EOFError, OSError):
            pass  # dead: the caller sees it through the sentinel
        return done

    def _fail(self, i: int, w: _Worker, results: list, pending: deque[_Item], *, timed_out: bool) -> int:
        """Kill/replace worker ``i``; settle its current item; requeue the rest of its chunk.
        Returns how many items were settled (0 or 1)."""
        item = w.inflight.popleft()
        rest = list(w.inflight)
        w.inflight.clear()
        self.stats.max_item_s = max(self.stats.max_item_s, time.monotonic() - w.started)
        settled = 1
        if timed_out:
            self.stats.timeouts += 1
            log.warning("%s item %d passed its %.1f s deadline", self._name, item.index, self.deadline_s)
            results[item.index] = self.failure
        else:
            self.stats.crashes += 1
            code = w.proc.exitcode
            if item.attempt < 1:
                log.warning("%s worker died (exit %s) on item %d; retrying it", self._name, code, item.index)
                rest.insert(0, _Item(item.index, item.args, item.attempt + 1))
                settled = 0
            else:
                log.warning("%s worker died (exit %s) on item %d again", self._name, code, item.index)
                results[item.index] = self.failure
        pending.extendleft(reversed(rest))
        self._replace(i, w)
        return settled

    def _replace(self, i: int, w: _Worker) -> _Worker:
        w.stop(force=True)
        fresh = self._spawn()
        self._workers[i] = fresh
        self.stats.respawns += 1
        return fresh
