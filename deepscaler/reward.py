"""DeepScaleR's outcome reward: 1.0 for a correct final answer, else 0.0.

Semantics (``compute_score(response, ground_truth)``), as in DeepScaleR's ``RewardMathFn``:

* The response must close its reasoning with ``</think>``. The opening ``<think>`` may be
  missing, because the newer chat template already put it in the prompt. No ``</think>``: 0.
* The answer is the LAST ``\\boxed{...}`` in the text after the FIRST ``</think>`` (braces
  balanced, so ``\\boxed{\\frac{1}{2}}`` is whole). Like Hendrycks' ``last_boxed_only_string``,
  ``\\fbox{...}`` counts when there is no ``\\boxed`` at all, and the space form
  ``\\boxed 5`` runs to the next ``$`` or line end. A box that is never closed, an empty box, or
  no box: 0. A box that appears only inside the reasoning does not count.
* ``ground_truth`` may be a str, int, float (AMC stores 142.0), a list of accepted forms
  (Minerva, OlympiadBench) or None (always 0). A ground truth holding ``\\boxed{}`` is reduced
  to the box's content first, as DeepScaleR does.
* Correct means: equal after DeepScaleR's (Hendrycks') string normalisation, the cheap path
  that settles most answers; otherwise equal under math-verify, which replaced DeepScaleR's
  own sympy grader here. One rule of DeepScaleR's grader is kept on top of math-verify: when
  the gold and the answer are both plain integer fractions, they must be written the same
  way (an unreduced ``\\frac{2}{4}`` for gold ``\\frac{1}{2}`` is wrong), because math-verify
  would accept it. Anything that raises while grading counts as 0.

Why a process pool (``BatchScorer``): math-verify bounds its own sympy work with SIGALRM,
which Python only allows in a process's main thread (from a thread it raises ValueError,
i.e. every answer that needs math-verify would silently score 0). And its alarm does not stop
everything: big integer arithmetic such as ``\\boxed{9^{9^{9^9}}}`` runs in C and can hold a
core for minutes. So the orchestrator and eval score in worker processes, each item under a
hard deadline: a worker whose current item overruns is SIGKILLed, the item scores 0, a fresh
worker takes over the rest of its chunk. ``compute_score`` itself refuses to run outside the
main thread rather than return silent zeros.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Sequence

from math_verify import parse, verify

from deepscaler.process import usable_cpus
from deepscaler.data import normalize_answers

log = logging.getLogger("deepscaler.reward")

THINK_END = "</think>"

__all__ = [
    "THINK_END",
    "BatchScorer",
    "ScorerStats",
    "compute_score",
    "extract_answer",
    "gold_answers",
    "grade_answer",
    "last_boxed",
    "mathd_normalize",
]


# --------------------------------------------------------------------------- extraction


def _balanced_group(text: str, start: int) -> str | None:
    """The content of the brace group opening at ``text[start] == "{"``, or None if it never
    closes. Escaped braces (``\\{``, ``\\}``) do not count, so ``\\{1,2\\}`` and
    ``\\left\\{ ... \\right.`` stay inside the group."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed`` (or, when there is none, the last ``\\fbox``).

    Why this shape: it is Hendrycks' ``last_boxed_only_string`` + ``remove_boxed``, which
    DeepScaleR uses, with two repairs: escaped braces do not unbalance the group, and the space
    form ``\\boxed 5`` is read at the LAST box instead of wherever ``"\\boxed "`` first appears.
    ``\\boxed{\\boxed{5}}`` gives ``5`` (the inner box is the last one to start).
    """
    for command in ("\\boxed", "\\fbox"):
        idx = text.rfind(command)
        if idx >= 0:
            break
    else:
        return None
    rest_at = idx + len(command)
    rest = text[rest_at:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _balanced_group(text, rest_at + len(rest) - len(stripped))
    elif rest[:1].isalpha():
        return None  # another control word, e.g. \boxedfoo
    else:
        # \boxed 5$ or \boxed5: the rest of the formula (Hendrycks: up to the next "$").
        content = re.split(r"[$\n]", rest, maxsplit=1)[0].strip().rstrip(".")
    if content is None or not content.strip():
        return None
    return content.strip()


# A LaTeX backslash eaten by a Python string escape: "\boxed" typed in a non-raw literal (or a
# shell command such as python -c "...\\boxed...") arrives as "\x08oxed", "\frac" as "\x0crac".
# No model emits these control characters, so they are turned back into the command they came
# from; tab and carriage return only before a LaTeX command they can start (\times, \text,
# \right), since plain tabs and line ends are ordinary text.
_ESCAPE_DAMAGE = re.compile(
    r"[\x07\x08\x0b\x0c](?=[A-Za-z])"
    r"|\t(?=(?:imes|heta|an|ilde|riangle|frac|ext[a-z]*)(?![A-Za-z]))"
    r"|\r(?=(?:ight|angle|ho)(?![A-Za-z]))"
)
_ESCAPED_LETTER = {"\x07": "a", "\x08": "b", "\x0b": "v", "\x0c": "f", "\t": "t", "\r": "r"}


def repair_escapes(text: str) -> str:
    """Undo Python-escape damage to LaTeX commands (see ``_ESCAPE_DAMAGE``)."""
    return _ESCAPE_DAMAGE.sub(lambda m: "\\" + _ESCAPED_LETTER[m.group()], text)


def extract_answer(response: Any) -> str | None:
    """The final answer of a response: the last box after the first ``</think>``, or None.

    Why after ``</think>``: the reward must only pay for an answer the model commits to once it
    has closed its reasoning; boxes inside the reasoning are drafts.
    """
    if not isinstance(response, str):
        return None
    _, sep, after = repair_escapes(response).partition(THINK_END)
    if not sep:
        return None
    return last_boxed(after)


def gold_answers(ground_truth: Any) -> tuple[str, ...]:
    """Every accepted form of a ground truth as non-empty strings; () when there is none.

    Why: the data files store answers as str, float (AMC), or a list of alternative forms
    (``deepscaler.data.normalize_answers`` reads all of them); DeepScaleR accepts a match with
    any of them, and unboxes a gold that holds ``\\boxed{}``.
    """
    forms: list[str] = []
    for text in normalize_answers(ground_truth):
        text = repair_escapes(text).strip()
        if "\\boxed" in text or "\\fbox" in text:
            text = last_boxed(text) or ""
        if text and text not in forms:
            forms.append(text)
    return tuple(forms)


# --------------------------------------------------------------------------- normalisation

_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|textrm|textnormal|mathrm|mbox)\{([^{}]*)\}$")
_UNIT_WORDS = (
    "centimeter|centimetre|meter|metre|kilometer|mile|inch|foot|feet|yard|cm|mm|km|"
    "second|minute|hour|day|week|month|year|degree|dollar|cent|unit"
)
# A trailing unit in a text box: "5\text{ cm}", "3 \mbox{ hours}", "2\mathrm{~m}^2".
_TEXT_UNIT_RE = re.compile(
    r"^(.*\S)\s*\\(?:text|textrm|textnormal|mathrm|mbox)\{\s*~?[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?$"
)
# A trailing plain unit word after a number or group: "5 cm", "12 degrees", "3 square units".
_WORD_UNIT_RE = re.compile(
    rf"(?<=[\d}}])\s*(?:(?:square|sq\.?|cubic)\s+)?(?:{_UNIT_WORDS})(?:e?s)?\.?(?:\^\{{?\d\}}?)?$"
)
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_SPACING_RE = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)$")
_SLASH_FRACTION_RE = re.compile(r"^(-?\d+)/(\d+)$")
_PLAIN_FRACTION_RE = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")


def _canonical_number(s: str) -> str:
    """Plain numbers in one spelling: "1,000" -> "1000", "142.0" -> "142", ".50" -> "0.5"."""
    if len(s) > 64:  # not a number anyone types; also keeps int/str conversions cheap
        return s
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _DECIMAL_RE.match(s):
        try:
            value = Decimal(s)
        except InvalidOperation:
            return s
        if value == value.to_integral_value():
            return str(int(value))
        return format(value.normalize(), "f")
    return s


def mathd_normalize(answer: str) -> str:
    """DeepScaleR's (Hendrycks') ``mathd_normalize_answer``, with a few of its ``_normalize``
    ideas, for the cheap exact-match path.

    Why: most correct answers differ from the gold only in spelling (``\\dfrac`` vs ``\\frac``,
    ``\\frac12``, ``x=3``, ``10\\%``, ``30^\\circ``, ``5\\text{ cm}``, ``1,000``, ``142.0``, a
    trailing period), and a string compare settles them in microseconds without math-verify.
    Only equality of two normalised strings is ever used, so this errs on the side of changing
    little; math-verify decides everything else.
    """
    s = answer.strip().replace("\n", "").rstrip(".").rstrip()
    m = _WRAPPER_RE.match(s)
    if m:
        s = m.group(1).strip()
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = _DEGREES_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "")
    s = _SPACING_RE.sub(" ", s).strip()
    m = _TEXT_UNIT_RE.match(s)
    if m:
        s = m.group(1)
    s = _WORD_UNIT_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    # "k = 5" -> "5" when the left side is a short name (Hendrycks: at most 2 characters).
    parts = s.split("=")
    if len(parts) == 2 and 0 < len(parts[0].strip()) <= 2:
        s = parts[1]
    s = s.replace(" ", "")
    s = s.rstrip(".")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # ".5" -> "0.5", "{.5}" -> "{0.5}"
    s = re.sub(r"\\sqrt([0-9A-Za-z])", r"\\sqrt{\1}", s)  # \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)(?=\{)", r"\\frac{\1}", s)  # \frac1{72}
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)  # \frac{72}1
    s = _canonical_number(s)
    m = _SLASH_FRACTION_RE.match(s)
    if m:
        s = "\\frac{%s}{%s}" % m.groups()
    if s in ("0.5", "-0.5"):
        s = s.replace("0.5", "\\frac{1}{2}")
    return s


def _plain_fraction(normalised: str) -> tuple[int, int] | None:
    """(signed numerator, denominator) as written, for a plain integer fraction, else None.

    Why: DeepScaleR's grader compares two plain fractions literally ("if fractions aren't
    reduced, then shouldn't be marked as correct"); only the sign's position is free.
    """
    m = _PLAIN_FRACTION_RE.match(normalised)
    if not m:
        return None
    sign, num, den = m.groups()
    num_i, den_i = int(num), int(den)
    if den_i == 0:
        return None
    negative = (sign == "-") ^ (num_i < 0) ^ (den_i < 0)
    return (-abs(num_i) if negative else abs(num_i), abs(den_i))


# --------------------------------------------------------------------------- grading


def _as_latex(text: str) -> str:
    """Wrap an answer so that math-verify parses ALL of it as LaTeX (its boxed extractor)."""
    text = text.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return "\\boxed{" + text + "}"


def _math_verify_equal(gold: str, answer: str) -> bool:
    """math-verify's verdict with its default (SIGALRM) timeouts; any failure is False."""
    try:
        return bool(verify(parse(_as_latex(gold)), parse(_as_latex(answer))))
    except Exception:  # noqa: BLE001 - a grader error is a wrong answer, never a crash
        return False


def _matches(answer: str, gold: str) -> bool:
    a, g = mathd_normalize(answer), mathd_normalize(gold)
    if not a or not g:
        return False
    if a == g:
        return True
    fa, fg = _plain_fraction(a), _plain_fraction(g)
    if fa is not None and fg is not None:
        return fa == fg
    return _math_verify_equal(gold, answer)


def grade_answer(answer: str, golds: Iterable[str]) -> bool:
    """True when the extracted answer equals any accepted gold form.

    Why two stages: the normalised string match is DeepScaleR's own first check and is ~100x
    cheaper than math-verify, which then handles what spelling cannot (``0.5`` vs ``1/2``,
    ``\\frac{\\sqrt3}{2}`` vs ``\\frac{1}{2}\\sqrt{3}``, sets, intervals).
    """
    for gold in golds:
        try:
            if _matches(answer, gold):
                return True
        except Exception:  # noqa: BLE001
            continue
    return False


def _require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "deepscaler.reward.compute_score must run in a process's main thread: math-verify's "
            "timeouts use SIGALRM and fail in other threads (every answer would score 0). "
            "Use deepscaler.reward.BatchScorer, which scores in worker processes."
        )


def compute_score(response: str, ground_truth: Any) -> float:
    """DeepScaleR's reward for one response: 1.0 if correct, else 0.0 (see the module doc).

    Pure and deterministic. Must be called from the main thread (RuntimeError otherwise), and
    a pathological answer can hold it for minutes: batch callers use ``BatchScorer``.
    """
    _require_main_thread()
    try:
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        golds = gold_answers(ground_truth)
        return 1.0 if golds and grade_answer(answer, golds) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


# --------------------------------------------------------------------------- worker pool

# Test hooks (only when a BatchScorer is built with _test_hooks=True): a gold equal to one of
# these makes the worker die or hang on that item.
CRASH_SENTINEL = "__deepscaler_reward_test_crash__"
HANG_SENTINEL = "__deepscaler_reward_test_hang__"


def _worker_main(conn: multiprocessing.connection.Connection, test_hooks: bool) -> None:
    """Worker loop: receive a chunk [(index, answer, golds)], send (index, score) per item.

    One message per finished item lets the parent know when each item started, so it can
    enforce a per-item deadline; one message per chunk keeps the parent's sends cheap.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _math_verify_equal("1/2", "0.5")  # warm math-verify's lazy parser set-up
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, answer, golds in chunk:
            if test_hooks and CRASH_SENTINEL in golds:
                os._exit(3)
            if test_hooks and HANG_SENTINEL in golds:
                time.sleep(3600)
            try:
                score = 1.0 if grade_answer(answer, golds) else 0.0
            except Exception:  # noqa: BLE001
                score = 0.0
            conn.send((index, score))


@dataclass
class ScorerStats:
    """Counters since the scorer was built, for the caller's logs."""

    items: int = 0  # items scored (all of them, including those settled without a worker)
    graded: int = 0  # items sent to a worker
    timeouts: int = 0  # items killed at their deadline (scored 0)
    crashes: int = 0  # worker deaths we did not cause (the item in flight is retried once)
    respawns: int = 0  # workers started to replace a killed or dead one
    max_item_s: float = 0.0  # slowest item seen by a worker (start to result or kill)


@dataclass
class _Item:
    index: int
    answer: str
    golds: tuple[str, ...]
    attempt: int = 0


class _Worker:
    __slots__ = ("proc", "conn", "inflight", "started")

    def __init__(self, ctx: Any, test_hooks: bool) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child_conn, test_hooks), name="deepscaler-reward", daemon=True
        )
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


class BatchScorer:
    """Scores many (response, ground_truth) pairs in long-lived worker processes.

    ``score(pairs)`` returns ``compute_score`` of every pair, in order. Each item gets a hard
    deadline (``deadline_s``, from the moment its worker starts it): past it the worker is
    SIGKILLed, the item scores 0 (``stats.timeouts``), and a fresh worker takes the rest of
    the chunk. A worker that dies by itself (``stats.crashes``) is replaced the same way; the
    item it was on is retried once, then scores 0. Extraction (``</think>``, the last box)
    runs in the calling process, so only short answer strings cross the pipes.

    Workers come from multiprocessing's "forkserver" (safe in a process that has threads,
    and the server preloads this module, so a replacement starts in milliseconds). Use it as a
    context manager, or call ``close()``: afterwards no worker process is left. (The
    forkserver and resource-tracker helpers are multiprocessing's own per-interpreter
    singletons and end with the interpreter.) Concurrent ``score`` calls run one at a time.
    """

    def __init__(
        self,
        workers: int | None = None,
        deadline_s: float = 10.0,
        *,
        chunk_size: int | None = None,
        _test_hooks: bool = False,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.num_workers = int(workers) if workers else usable_cpus()
        if self.num_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.deadline_s = float(deadline_s)
        self.chunk_size = chunk_size
        self.stats = ScorerStats()
        self._test_hooks = _test_hooks
        self._ctx = multiprocessing.get_context("forkserver")
        # The forkserver imports these once and every worker is a fork of it: no per-worker
        # imports, and no re-import of the caller's main module (multiprocessing's default
        # preload, kept). Only takes effect if this interpreter's forkserver is not running yet.
        self._ctx.set_forkserver_preload(["__main__", __name__])
        self._workers: list[_Worker] = []
        self._closed = False
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        for _ in range(self.num_workers):
            self._workers.append(_Worker(self._ctx, self._test_hooks))

    # -- lifecycle

    def __enter__(self) -> "BatchScorer":
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

    # -- scoring

    def score(self, pairs: Sequence[tuple[str, Any]]) -> list[float]:
        """``[compute_score(r, gt) for r, gt in pairs]``, in parallel, each item under the deadline."""
        if self._closed:
            raise RuntimeError("BatchScorer is closed")
        results = [0.0] * len(pairs)
        pending: deque[_Item] = deque()
        for index, (response, ground_truth) in enumerate(pairs):
            try:
                answer = extract_answer(response)
                golds = gold_answers(ground_truth) if answer is not None else ()
            except Exception:  # noqa: BLE001
                answer, golds = None, ()
            if answer is not None and golds:
                pending.append(_Item(index, answer, golds))
        with self._lock:
            self.stats.items += len(pairs)
            self.stats.graded += len(pending)
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

    def _run(self, pending: deque[_Item], results: list[float]) -> None:
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
                        w.conn.send([(it.index, it.answer, it.golds) for it in items])
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

    def _drain(self, w: _Worker, results: list[float]) -> int:
        """Take every result the worker has sent; return how many items finished."""
        done = 0
        try:
            while w.inflight and w.conn.poll():
                index, score = w.conn.recv()
                item = w.inflight.popleft()
                if item.index != index:  # cannot happen: a worker answers in order
                    raise RuntimeError(f"reward worker answered item {index}, expected {item.index}")
                results[index] = float(score)
                now = time.monotonic()
                self.stats.max_item_s = max(self.stats.max_item_s, now - w.started)
                w.started = now
                done += 1
        except (EOFError, OSError):
            pass  # dead: the caller sees it through the sentinel
        return done

    def _fail(self, i: int, w: _Worker, results: list[float], pending: deque[_Item], *, timed_out: bool) -> int:
        """Kill/replace worker ``i``; settle its current item; requeue the rest of its chunk.
        Returns how many items were settled (0 or 1)."""
        item = w.inflight.popleft()
        rest = list(w.inflight)
        w.inflight.clear()
        elapsed = time.monotonic() - w.started
        self.stats.max_item_s = max(self.stats.max_item_s, elapsed)
        settled = 1
        if timed_out:
            self.stats.timeouts += 1
            log.warning("reward item %d passed its %.1f s deadline; scored 0", item.index, self.deadline_s)
            results[item.index] = 0.0
        else:
            self.stats.crashes += 1
            code = w.proc.exitcode
            if item.attempt < 1:
                log.warning("reward worker died (exit %s) on item %d; retrying it", code, item.index)
                rest.insert(0, _Item(item.index, item.answer, item.golds, item.attempt + 1))
                settled = 0
            else:
                log.warning("reward worker died (exit %s) on item %d again; scored 0", code, item.index)
                results[item.index] = 0.0
        pending.extendleft(reversed(rest))
        self._replace(i, w)
        return settled

    def _replace(self, i: int, w: _Worker) -> _Worker:
        w.stop(force=True)
        fresh = _Worker(self._ctx, self._test_hooks)
        self._workers[i] = fresh
        self.stats.respawns += 1
        return fresh
