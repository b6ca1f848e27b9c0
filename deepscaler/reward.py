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
  would accept it. Likewise an integer gold needs an integer literal (``\\frac{80}{2}`` for 40
  scores 0); formatting around the whole answer is not an expression and is removed first
  (``{40}``, ``\\mathbf{40}``, ``6{,}700``, ``6,700``, ``6\\,700``). Anything that raises
  while grading counts as 0.

Why a process pool (``BatchScorer``, on ``deepscaler/deadline_pool.py``): math-verify bounds
its own sympy work with SIGALRM, which Python only allows in a process's main thread (from a
thread it raises ValueError, i.e. every answer that needs math-verify would silently score
0). And its alarm does not stop everything: big integer arithmetic such as
``\\boxed{9^{9^{9^9}}}`` runs in C and can hold a core for minutes. So the orchestrator and
eval score in worker processes, each item under a hard deadline: a worker whose current item
overruns is SIGKILLed and the item scores 0. ``compute_score`` itself refuses to run outside
the main thread rather than return silent zeros.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Sequence

from math_verify import parse, verify

from deepscaler import faults
from deepscaler.data import normalize_answers
from deepscaler.deadline_pool import DeadlinePool
from deepscaler.process import usable_cpus

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
    end = _group_end(text, start)
    return None if end < 0 else text[start + 1 : end]


def _group_end(text: str, start: int) -> int:
    """The index of the ``}`` closing the group that opens at ``text[start]``, or -1."""
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
                return i
        i += 1
    return -1


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

# Commands that only change how their argument looks. An answer that is wholly one of them
# (``\\mathbf{40}``, ``\\text{ 40 }``) is its argument; \\mathbb, \\sqrt, \\operatorname change
# the meaning and are not here.
_FORMAT_COMMAND_RE = re.compile(
    r"^\\(?:text|textbf|textrm|textnormal|textit|textsf|texttt|textup|mathrm|mathbf|mathit|mathsf|"
    r"mathtt|mathnormal|boldsymbol|bm|mbox|hbox)\s*(?=\{)"
)
# Declarations that restyle the rest of their group: ``{\\bf 40}``, ``\\displaystyle 40``.
_FORMAT_DECLARATION_RE = re.compile(r"^\\(?:displaystyle|textstyle|bf|rm|it|boldmath)(?![A-Za-z])\s*")
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


def _strip_formatting(s: str) -> str:
    """The answer without the formatting around ALL of it: outer braces, a formatting command
    or declaration (see ``_FORMAT_COMMAND_RE``), surrounding spaces, repeatedly; and ``{,}``
    (LaTeX's thousands separator) as ``,``, which ``_canonical_number`` then drops only in
    well-formed groups of three digits, so ``1{,}2`` stays a list.

    Why only the whole answer: ``\\mathbf{40}`` is the integer 40 and must meet the literal
    integer rule as one, while formatting inside an expression (``\\mathbf{v}+\\mathbf{w}``)
    is left for math-verify.
    """
    s = s.replace("{,}", ",").strip()
    for _ in range(8):  # layers; a bound keeps a pathological {{{{...}}}} linear
        m = _FORMAT_COMMAND_RE.match(s) or _FORMAT_DECLARATION_RE.match(s)
        rest = s[m.end():] if m else s
        if rest.startswith("{") and _group_end(rest, 0) == len(rest) - 1:
            rest = rest[1:-1]
        elif m is None or m.re is _FORMAT_COMMAND_RE:
            return s  # a command whose group does not span the rest, or nothing to strip
        rest = rest.strip()
        if not rest:
            return s
        s = rest
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
    s = _strip_formatting(answer.strip().replace("\n", "").rstrip(".").rstrip())
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = _DEGREES_RE.sub("", s)
    s = s.replace("\\$", "").replace("$", "")
    s = _strip_formatting(_SPACING_RE.sub(" ", s))
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


# math-verify bounds each parse and each comparison by itself (SIGALRM, whole seconds); this is
# the budget of one compute_score call over all of them, whatever the number of gold forms.
GRADING_BUDGET_S = 5.0
_INTEGER_RE = re.compile(r"^-?\d+$")


def _math_verify_equal(gold: str, answer: str, deadline: float) -> bool:
    """math-verify's verdict, its parses and comparison bounded by ``deadline`` (a
    ``time.monotonic()`` value); any failure, and an exhausted budget, is False."""

    def left() -> int:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return max(1, int(remaining))  # SIGALRM counts whole seconds

    try:
        g = parse(_as_latex(gold), parsing_timeout=left())
        a = parse(_as_latex(answer), parsing_timeout=left())
        return bool(verify(g, a, timeout_seconds=left()))
    except Exception:  # noqa: BLE001 - a grader error is a wrong answer, never a crash
        return False


def _matches(answer: str, gold: str, deadline: float, literal_integers: bool) -> bool:
    a, g = mathd_normalize(answer), mathd_normalize(gold)
    if not a or not g:
        return False
    if a == g:
        return True
    fa, fg = _plain_fraction(a), _plain_fraction(g)
    if fa is not None and fg is not None:
        return fa == fg
    if literal_integers and _INTEGER_RE.match(g) and not _INTEGER_RE.match(a):
        return False  # DeepScaleR's rule: an integer answer is written as one (not \frac{80}{2}, 2^{10})
    return _math_verify_equal(gold, answer, deadline)


def grade_answer(answer: str, golds: Iterable[str], *, literal_integers: bool = True,
                 budget_s: float = GRADING_BUDGET_S) -> bool:
    """True when the extracted answer equals any accepted gold form.

    Why two stages: the normalised string match is DeepScaleR's own first check and is ~100x
    cheaper than math-verify, which then handles what spelling cannot (``0.5`` vs ``1/2``,
    ``\\frac{\\sqrt3}{2}`` vs ``\\frac{1}{2}\\sqrt{3}``, sets, intervals). ``literal_integers``
    (``orchestrator.reward.integer_answers: literal``): a gold that is an integer is matched
    only by an integer literal, as DeepScaleR's grader does, so the model learns to finish the
    arithmetic; math-verify alone would pay ``\\frac{80}{2}`` or ``2^{10}``. ``budget_s``
    bounds math-verify's work over all the gold forms together.
    """
    deadline = time.monotonic() + budget_s
    for gold in golds:
        try:
            if _matches(answer, gold, deadline, literal_integers):
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


def compute_score(response: str, ground_truth: Any, *, literal_integers: bool = True) -> float:
    """DeepScaleR's reward for one response: 1.0 if correct, else 0.0 (see the module doc).

    Pure and deterministic. Must be called from the main thread (RuntimeError otherwise).
    math-verify's work is bounded by ``GRADING_BUDGET_S`` over all gold forms, but big-integer
    arithmetic in C can outlast its alarm: batch callers use ``BatchScorer``, which kills.
    """
    _require_main_thread()
    try:
        answer = extract_answer(response)
        if answer is None:
            return 0.0
        golds = gold_answers(ground_truth)
        return 1.0 if golds and grade_answer(answer, golds, literal_integers=literal_integers) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


# --------------------------------------------------------------------------- in worker processes


def _grade(answer: str, golds: tuple[str, ...], literal_integers: bool, fault: str | None) -> float:
    """One item in a pool worker. ``fault``: the ``DEEPSCALER_FAULT`` the scorer was built
    under (fault tests make a worker die or hang on the item whose gold they name)."""
    if faults.fires(fault, "reward.worker_crash", *golds):
        os._exit(3)
    if faults.fires(fault, "reward.worker_hang", *golds):
        time.sleep(3600)
    return 1.0 if grade_answer(answer, golds, literal_integers=literal_integers) else 0.0


def _warm() -> None:
    grade_answer("0.5", ["1/2"])  # math-verify's lazy parser set-up, once per worker


@dataclass
class ScorerStats:
    """Counters since the scorer was built, for the caller's logs."""

    items: int = 0  # items scored (all of them, including those settled without a worker)
    graded: int = 0  # items sent to a worker
    timeouts: int = 0  # items killed at their deadline (scored 0)
    crashes: int = 0  # worker deaths we did not cause (the item in flight is retried once)
    respawns: int = 0  # workers started to replace a killed or dead one
    max_item_s: float = 0.0  # slowest item seen by a worker (start to result or kill)


class BatchScorer:
    """``compute_score`` of many (response, ground_truth) pairs, in a :class:`DeadlinePool`.

    Extraction (``</think>``, the last box) runs in the calling process, so only short answer
    strings cross the pipes; an item past ``deadline_s`` scores 0 (``stats.timeouts``), as does
    one whose worker dies twice. Use it as a context manager, or call ``close()``.
    """

    def __init__(self, workers: int | None = None, deadline_s: float = 10.0, *, chunk_size: int | None = None,
                 literal_integers: bool = True) -> None:
        self.pool = DeadlinePool(_grade, int(workers) if workers else usable_cpus(), deadline_s, failure=0.0,
                                 warmup=_warm, chunk_size=chunk_size, name="deepscaler-reward")
        self.num_workers = self.pool.num_workers
        self.literal_integers = literal_integers
        self._fault = faults.configured()
        self._items = 0

    def __enter__(self) -> "BatchScorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()

    @property
    def pids(self) -> list[int]:
        return self.pool.pids

    @property
    def stats(self) -> ScorerStats:
        p = self.pool.stats
        return ScorerStats(self._items, p.items, p.timeouts, p.crashes, p.respawns, p.max_item_s)

    def score(self, pairs: Sequence[tuple[str, Any]]) -> list[float]:
        """``[compute_score(r, gt) for r, gt in pairs]``, in parallel, each item under the deadline."""
        items = []
        for index, (response, ground_truth) in enumerate(pairs):
            try:
                answer = extract_answer(response)
                golds = gold_answers(ground_truth) if answer is not None else ()
            except Exception:  # noqa: BLE001
                answer, golds = None, ()
            if answer is not None and golds:
                items.append((index, (answer, golds, self.literal_integers, self._fault)))
        self._items += len(pairs)
        return self.pool.run(items, len(pairs))
