"""The DeepScaleR reward: answer extraction, normalisation, math-verify, and the deadline pool."""

import inspect
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from deepscaler import reward
from deepscaler.reward import (BatchScorer, compute_score, extract_answer, gold_answers, grade_answer, last_boxed,
                               mathd_normalize)

# Golds that arm the pool's fault hooks (deepscaler/faults.py) when DEEPSCALER_FAULT names them.
HANG_GOLD, CRASH_GOLD = "hang-here", "crash-here"

LONG_REASONING = "Let me think about this step by step. We try a few values and check. " * 3000  # ~200 kB


def ans(boxed: str, before: str = "<think>work</think> The answer is ") -> str:
    """A well-formed response whose final answer is ``\\boxed{boxed}``."""
    return before + "\\boxed{" + boxed + "}."


# (id, response, ground truth, expected reward). Expected values are DeepScaleR's intent;
# where math-verify and DeepScaleR's original grader disagree the comment says which wins.
CASES = [
    # --- the acceptance example and fraction/decimal spellings
    ("acceptance", "<think>x</think> so \\boxed{\\frac12}", "0.5", 1.0),
    # The acceptance command typed in a shell: python -c "...\\boxed{\\frac12}..." hands Python
    # '\boxed{\frac12}', whose \b and \f are escapes (backspace, form feed).
    ("python_escapes_eaten", "<think>x</think> so \x08oxed{\x0crac12}", "0.5", 1.0),
    ("python_escapes_tab_text", ans("5\text{ cm}"), "5", 1.0),
    ("plain_tab_kept", "<think>x</think>\tanswer: \\boxed{7}", "7", 1.0),
    ("dfrac_vs_frac", ans("\\dfrac{1}{2}"), "\\frac{1}{2}", 1.0),
    ("tfrac_vs_decimal", ans("\\tfrac{3}{4}"), "0.75", 1.0),
    ("frac_vs_half", ans("\\frac{1}{2}"), "0.5", 1.0),
    ("decimal_vs_frac", ans("0.50"), "\\frac12", 1.0),
    ("slash_vs_frac", ans("1/2"), "\\frac{1}{2}", 1.0),
    ("decimal_vs_improper", ans("1.5"), "\\frac{3}{2}", 1.0),
    ("sign_position", ans("-\\frac{1}{2}"), "\\frac{-1}{2}", 1.0),
    # DeepScaleR's grader: two plain fractions must be written alike (math-verify would say 1).
    ("unreduced_fraction", ans("\\frac{2}{4}"), "\\frac{1}{2}", 0.0),
    ("truncated_decimal_wrong", ans("0.333"), "\\frac13", 0.0),
    ("similar_fraction_wrong", ans("\\frac{1}{3}"), "\\frac{1}{2}", 0.0),
    # --- integers and numbers
    ("commas_in_answer", ans("1,000,000"), "1000000", 1.0),
    ("commas_in_gold", ans("1234"), "1,234", 1.0),
    ("float_gold", ans("142"), 142.0, 1.0),
    ("float_answer_int_gold", ans("142.0"), "142", 1.0),
    ("int_gold", ans("204"), 204, 1.0),
    ("float_gold_half", ans("\\frac{1}{2}"), 0.5, 1.0),
    ("digits_swapped_wrong", ans("21"), "12", 0.0),
    ("sign_wrong", ans("-5"), "5", 0.0),
    ("sqrt_not_square", ans("\\sqrt{2}"), "2", 0.0),
    # math-verify evaluates; DeepScaleR's grader demands an integer literal for an integer gold,
    # and so do we by default (orchestrator.reward.integer_answers: literal).
    ("unevaluated_power", ans("2^{10}"), "1024", 0.0),
    ("trailing_period", "</think> So the answer is $\\boxed{5.}$", "5", 1.0),
    ("dollars", ans("\\$1,000"), "1000", 1.0),
    # --- equations, text, units, percent, degrees
    ("x_equals", ans("x=3"), "3", 1.0),
    ("x_equals_wrong", ans("x=4"), "3", 0.0),
    ("gold_x_equals", ans("3"), "x = 3", 1.0),
    ("text_monday", ans("\\text{Monday}"), "Monday", 1.0),
    ("text_wrong_day", ans("\\text{Tuesday}"), "Monday", 0.0),
    ("units_text", ans("5 \\text{ cm}"), "5", 1.0),
    ("units_word", ans("12 inches"), "12", 1.0),
    ("percent", ans("10\\%"), "10", 1.0),  # DeepScaleR strips \% too (math-verify agrees)
    ("percent_as_fraction", ans("50\\%"), "0.5", 1.0),
    ("degrees", ans("30^\\circ"), "30", 1.0),
    ("degrees_braced_gold", ans("30"), "30^{\\circ}", 1.0),
    ("multiple_choice", ans("\\text{(B)}"), "B", 1.0),
    ("multiple_choice_wrong", ans("(B)"), "A", 0.0),
    # --- intervals, sets, tuples, expressions
    ("interval", ans("[1, 2)"), "[1,2)", 1.0),
    ("interval_wrong_ends", ans("(1,2]"), "[1,2)", 0.0),
    ("interval_infinity", ans("(-\\infty, 3)"), "(-\\infty,3)", 1.0),
    ("set_unordered", ans("\\{2,1\\}"), "\\{1,2\\}", 1.0),
    ("tuple_ordered", ans("(2,1)"), "(1,2)", 0.0),
    ("left_right", ans("\\left(3, \\frac{\\pi}{2}\\right)"), "(3,\\frac{\\pi}{2})", 1.0),
    ("sqrt_forms", ans("\\frac{\\sqrt3}{2}"), "\\frac{1}{2}\\sqrt{3}", 1.0),
    ("polynomial_reordered", ans("x^4-2x^3-13x^2+14x+24"), "24 + 14x - 13x^2 - 2x^3 + x^4", 1.0),
    ("pi_not_3_14", ans("\\pi"), "3.14", 0.0),
    # --- where the answer is taken from
    ("nested_boxes", ans("\\boxed{5}"), "5", 1.0),
    ("boxed_space_form", "</think> Hence $\\boxed 5$.", "5", 1.0),
    ("fbox", "</think> Hence \\fbox{5}", "5", 1.0),
    ("last_box_wins", "</think> First \\boxed{4}, corrected: \\boxed{5}", "5", 1.0),
    ("last_box_wins_not_first", "</think> First \\boxed{4}, corrected: \\boxed{5}", "4", 0.0),
    ("box_only_in_reasoning", "<think>so \\boxed{5}</think> The answer is 5.", "5", 0.0),
    ("no_think_end", "<think>so the answer is \\boxed{5}", "5", 0.0),
    ("no_think_tags_at_all", "The answer is \\boxed{5}", "5", 0.0),
    ("think_open_absent", "reasoning without the opening tag</think> \\boxed{5}", "5", 1.0),
    ("second_think_end", "</think> \\boxed{5} </think>", "5", 1.0),
    ("empty_response", "", "5", 0.0),
    ("none_response", None, "5", 0.0),
    ("empty_box", ans(""), "5", 0.0),
    ("unclosed_last_box", "</think> \\boxed{5} then \\boxed{\\frac{1}{2}", "5", 0.0),
    ("very_long_response", "<think>" + LONG_REASONING + "</think> \\boxed{7}", "7", 1.0),
    # --- ground truth shapes
    ("list_gold_one", ans("9.6"), ["9.6\n"], 1.0),
    ("list_gold_alternatives", ans("0.02"), ["0.01", "0.02"], 1.0),
    ("list_gold_none_match", ans("0.03"), ["0.01", "0.02"], 0.0),
    ("none_gold", ans("5"), None, 0.0),
    ("empty_gold", ans("5"), "", 0.0),
    ("boxed_gold", ans("7"), "so \\boxed{7}", 1.0),
    # --- malformed LaTeX never raises, never scores
    ("malformed_frac", ans("\\frac{}{}"), "5", 0.0),
    ("malformed_parens", ans(")("), "5", 0.0),
    ("unknown_macro", ans("\\undefinedmacro{5}"), "6", 0.0),
    ("malformed_sqrt", ans("\\sqrt{}"), "0", 0.0),
]


@pytest.mark.parametrize("response,ground_truth,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_compute_score(response, ground_truth, expected):
    assert compute_score(response, ground_truth) == expected


def test_case_table_is_big_enough():
    """Big enough to mean something: many cases, unique names, and both verdicts well
    represented (a table of only 1.0s would pass a grader that pays everything)."""
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    verdicts = [c[3] for c in CASES]
    assert set(verdicts) == {0.0, 1.0} and min(verdicts.count(0.0), verdicts.count(1.0)) >= 15


def test_acceptance_example():
    assert compute_score("<think>x</think> so \\boxed{\\frac12}", "0.5") == 1.0


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("a \\boxed{1} b \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("$\\boxed 12$ and more", "12"),
        ("\\boxed {3}", "3"),
        ("\\fbox{4}", "4"),
        ("\\fbox{4} \\boxed{5}", "5"),
        ("\\boxed{5", None),
        ("\\boxed{}", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_after_first_think_end():
    assert extract_answer("<think>\\boxed{1}</think>\\boxed{2}</think>\\boxed{3}") == "3"
    assert extract_answer("\\boxed{1}") is None


@pytest.mark.parametrize(
    "raw,expected",
    [
        (None, ()),
        (True, ()),
        ("", ()),
        ("  7\n", ("7",)),
        (142.0, ("142",)),
        (0.5, ("0.5",)),
        (float("nan"), ()),
        (3, ("3",)),
        (["9.6\n"], ("9.6",)),
        (["11000\n", "11000"], ("11000",)),
        ("\\boxed{\\frac{1}{2}}", ("\\frac{1}{2}",)),
    ],
)
def test_gold_answers(raw, expected):
    assert gold_answers(raw) == expected


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("1,000", "1000"),
        ("142.00", "142"),
        ("\\text{Monday}", "Monday"),
        ("x = 3", "3"),
        ("30^{\\circ}", "30"),
        ("10\\%", "10"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("5\\!000", "5000"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("5 \\text{ cm}^2", "5"),
        ("5.", "5"),
    ],
)
def test_mathd_normalize(raw, expected):
    assert mathd_normalize(raw) == expected


def test_compute_score_refuses_other_threads():
    """math-verify's SIGALRM timeouts fail off the main thread: refuse, never silent zeros."""
    errors = []

    def run():
        try:
            compute_score(ans("1"), "1")
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


# --------------------------------------------------------------------------- batch scorer


def _alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _mixed_batch():
    pairs = [(c[1], c[2]) for c in CASES if c[0] != "very_long_response"]
    pairs += [(ans(str(i)), str(i if i % 3 else i + 1)) for i in range(30)]
    pairs += [(ans(f"\\frac{{{i}}}{{{i + 1}}}"), f"{i / (i + 1):.6f}") for i in range(1, 10)]
    return pairs


def test_batch_matches_compute_score_in_order():
    pairs = _mixed_batch()
    expected = [compute_score(r, g) for r, g in pairs]
    with BatchScorer(workers=2, deadline_s=10) as scorer:
        pids = scorer.pids
        assert scorer.score(pairs) == expected
        assert scorer.score([]) == []
        assert scorer.score(pairs[:3]) == expected[:3]
        assert scorer.stats.timeouts == 0 and scorer.stats.crashes == 0
        assert scorer.stats.items == len(pairs) + 3
        # Items without </think> or a box never reach a worker.
        assert scorer.stats.graded < scorer.stats.items
    assert not any(_alive(pid) for pid in pids)


def test_batch_score_works_from_a_thread():
    """The orchestrator may score from a worker thread: only the pool's workers need SIGALRM."""
    pairs = [(ans("0.5"), "\\frac12"), (ans("x=3"), "3"), ("no think", "1"), (ans("4"), "5")]
    out = []
    with BatchScorer(workers=1, deadline_s=10) as scorer:
        t = threading.Thread(target=lambda: out.append(scorer.score(pairs)))
        t.start()
        t.join(60)
    assert out == [[1.0, 1.0, 0.0, 0.0]]


@pytest.mark.slow
def test_batch_recovers_after_an_interrupted_call(monkeypatch):
    """Ctrl-C during score(): the next call must not receive the old batch's results."""
    monkeypatch.setenv("DEEPSCALER_FAULT", f"reward.worker_hang@{HANG_GOLD}")
    pairs = [(ans("1"), HANG_GOLD)] + [(ans(str(i)), str(i)) for i in range(20)]
    with BatchScorer(workers=2, deadline_s=30) as scorer:
        timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            scorer.score(pairs)
        timer.join()
        fresh = [(ans(str(i)), str(i + 1)) for i in range(20)]
        assert scorer.score(fresh) == [0.0] * 20
        assert scorer.score(pairs[1:]) == [1.0] * 20


@pytest.mark.slow
def test_batch_adversarial_items_hit_the_deadline():
    """The deadline is the promise (these items hold a core for minutes without it): each is
    killed within 3x its deadline, and the batch ends within 3x the deadlines of its bad items."""
    deadline = 2.0
    bad = [(ans("9^{9^{9^9}}"), "2"), (ans("2^{10^{10}}"), "3")]
    good = [(ans(str(i)), str(i)) for i in range(30)]
    pairs = good[:10] + bad[:1] + good[10:20] + bad[1:] + good[20:]
    # literal_integers off: the integer golds would settle these without math-verify
    with BatchScorer(workers=2, deadline_s=deadline, literal_integers=False) as scorer:
        start = time.monotonic()
        scores = scorer.score(pairs)
        elapsed = time.monotonic() - start
        assert scores == [0.0 if p in bad else 1.0 for p in pairs]
        assert scorer.stats.timeouts == len(bad)
        assert deadline <= scorer.stats.max_item_s <= 3 * deadline
        assert elapsed <= 3 * len(bad) * deadline
        # The pool is whole again afterwards.
        assert len(scorer.pids) == 2 and all(_alive(pid) for pid in scorer.pids)
        assert scorer.score(good[:5]) == [1.0] * 5


@pytest.mark.slow
def test_batch_worker_crash_loses_no_other_scores(monkeypatch):
    monkeypatch.setenv("DEEPSCALER_FAULT", f"reward.worker_crash@{CRASH_GOLD}")
    pairs = _mixed_batch()
    expected = [compute_score(r, g) for r, g in pairs]
    crash_at = len(pairs) // 2
    pairs.insert(crash_at, (ans("1"), CRASH_GOLD))
    expected.insert(crash_at, 0.0)
    with BatchScorer(workers=2, deadline_s=10) as scorer:
        assert scorer.score(pairs) == expected
        assert scorer.stats.crashes == 2  # the first death and the one retry
        assert scorer.stats.respawns == 2
        assert scorer.stats.timeouts == 0


@pytest.mark.slow
def test_batch_workers_killed_externally_mid_batch(monkeypatch):
    """SIGKILL from outside (OOM killer, an operator): the items in flight are retried."""
    monkeypatch.setenv("DEEPSCALER_FAULT", f"reward.worker_hang@{HANG_GOLD}")
    pairs = _mixed_batch()
    expected = [compute_score(r, g) for r, g in pairs]
    pairs.insert(5, (ans("1"), HANG_GOLD))  # keeps the batch running past the kill
    expected.insert(5, 0.0)
    with BatchScorer(workers=2, deadline_s=3) as scorer:
        victims = scorer.pids

        def kill():
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        timer = threading.Timer(0.5, kill)
        timer.start()
        try:
            assert scorer.score(pairs) == expected
        finally:
            timer.cancel()
        assert scorer.stats.crashes >= 1
        assert scorer.stats.timeouts == 1
        assert not set(victims) & set(scorer.pids)


def test_close_leaves_no_worker_processes():
    import multiprocessing

    scorer = BatchScorer(workers=2, deadline_s=5)
    pids = scorer.pids
    assert all(_alive(pid) for pid in pids)
    assert scorer.score([(ans("2"), "2")]) == [1.0]
    scorer.close()
    scorer.close()  # idempotent
    assert not any(_alive(pid) for pid in pids)
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    with pytest.raises(RuntimeError):
        scorer.score([(ans("2"), "2")])


def test_batch_scorer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        BatchScorer(workers=1, deadline_s=0)


# The module doc's rules, each with the example it gives: the doc names it and the code keeps it.
DOC_EXAMPLES = [
    ("</think>", "no </think>: 0", "<think>work \\boxed{5}", "5", 0.0),
    ("opening ``<think>`` may be\n  missing", "opening <think> missing", "work</think> so \\boxed{5}", "5", 1.0),
    ("LAST ``\\boxed{...}``", "the last box counts", ans("6", "<think>w</think> \\boxed{5} no, "), "6", 1.0),
    ("FIRST ``</think>``", "after the first </think>", "<think>a</think> \\boxed{6} </think> so", "6", 1.0),
    ("appears only inside the reasoning does not count", "box only in the reasoning",
     "<think>\\boxed{5}</think> five", "5", 0.0),
    ("``\\fbox{...}`` counts", "fbox without boxed", "<think>w</think> \\fbox{5}", "5", 1.0),
    ("``\\boxed 5``", "space form", "<think>w</think> \\boxed 5$", "5", 1.0),
    ("never closed", "unclosed box", "<think>w</think> \\boxed{5", "5", 0.0),
    ("an empty box", "empty box", ans(""), "5", 0.0),
    ("None (always 0)", "None gold", ans("5"), None, 0.0),
    ("AMC stores 142.0", "float gold", ans("142"), 142.0, 1.0),
    ("a list of accepted forms", "list gold", ans("0.02"), ["0.01", "0.02"], 1.0),
    ("reduced\n  to the box's content first", "boxed gold", ans("7"), "so \\boxed{7}", 1.0),
    ("an unreduced ``\\frac{2}{4}``", "unreduced fraction", ans("\\frac{2}{4}"), "\\frac{1}{2}", 0.0),
    ("``\\frac{80}{2}`` for 40\n  scores 0", "integer literal", ans("\\frac{80}{2}"), "40", 0.0),
    ("``6{,}700``", "formatting removed", ans("6{,}700"), "6700", 1.0),
    ("``\\mathbf{40}``", "bold removed", ans("\\mathbf{40}"), "40", 1.0),
]


@pytest.mark.parametrize("quote, name, response, gold, expected", DOC_EXAMPLES, ids=[e[1] for e in DOC_EXAMPLES])
def test_module_documents_semantics(quote, name, response, gold, expected):
    """The module doc is the reward's spec: each rule it states is there, and holds."""
    assert quote in reward.__doc__
    assert compute_score(response, gold) == expected


@pytest.mark.parametrize("boxed, gold", [("\\frac{80}{2}", "40"), ("2^{10}", "1024"), ("6 \\cdot 7", "42"),
                                         ("40 + 2", "42")])
def test_an_integer_gold_needs_an_integer_literal_unless_configured(boxed, gold):
    """DeepScaleR's grader: the arithmetic must be finished (integer_answers: literal, default);
    math-verify alone pays any equal value (integer_answers: math_verify)."""
    assert compute_score(ans(boxed), gold) == 0.0
    assert compute_score(ans(boxed), gold, literal_integers=False) == 1.0
    for literal in (gold, f"{gold}.0", f"{int(gold):,}"):
        assert compute_score(ans(literal), gold) == 1.0, literal


def test_one_call_keeps_its_grading_budget_over_every_gold_form():
    """Each gold form used to get a budget of its own (three forms: 15.4 s for this answer).
    The bound is the promise: with a short budget (the parameter the default comes from) and
    12 forms that each exhaust it, one call stays within 3x the budget; a budget per form would
    take 12x. The default budget is what compute_score uses."""
    budget = 2.0
    forms = ["2^{32}", "4294967296", "2^{2^5}", "4^{16}", "16^{8}", "256^{4}", "65536^{2}", "2^{16} \\cdot 2^{16}",
             "2^{31} \\cdot 2", "4^{8} \\cdot 4^{8}", "8^{10} \\cdot 4", "2^{30} \\cdot 4"]
    start = time.monotonic()
    assert not grade_answer("2^{2^{2^{5}}}", forms, literal_integers=False, budget_s=budget)
    elapsed = time.monotonic() - start
    assert elapsed <= 3 * budget, elapsed
    assert inspect.signature(grade_answer).parameters["budget_s"].default == reward.GRADING_BUDGET_S


def test_the_scorer_applies_the_integer_rule_it_is_given():
    pairs = [(ans("\\frac{80}{2}"), "40"), (ans("40"), "40")]
    with BatchScorer(workers=1, deadline_s=10) as strict, BatchScorer(workers=1, deadline_s=10,
                                                                     literal_integers=False) as lenient:
        assert strict.score(pairs) == [0.0, 1.0] and lenient.score(pairs) == [1.0, 1.0]


# Ordinary formatting of a right integer (issue 24): braces, bold/text wrappers, thousands
# separators ({,} and well-formed 3-digit groups), thin spaces, surrounding spaces.
FORMATTED_INTEGERS = [
    ("{40}", "40"), ("{{40}}", "40"), ("\\mathbf{40}", "40"), ("\\textbf{40}", "40"), ("\\text{40}", "40"),
    ("\\mathrm{40}", "40"), ("\\boldsymbol{40}", "40"), ("{\\bf 40}", "40"), ("\\displaystyle 40", "40"),
    ("6{,}700", "6700"), ("6,700", "6700"), ("1{,}000{,}000", "1000000"), ("\\mathbf{6{,}700}", "6700"),
    ("{\\mathbf{-1{,}234}}", "-1234"), ("6\\,700", "6700"), ("6\\!700", "6700"), ("  40  ", "40"),
    ("\\text{ 40 }", "40"), ("40.0", "40"), ("\\mathbf{40}", "\\mathbf{40}"), ("40", "{40}"),
    ("6700", "6{,}700"),
]


@pytest.mark.parametrize("boxed, gold", FORMATTED_INTEGERS)
def test_an_integer_in_ordinary_formatting_is_accepted(boxed, gold):
    assert compute_score(ans(boxed), gold) == 1.0


def test_the_scorer_accepts_formatted_integers_too():
    with BatchScorer(workers=1, deadline_s=10) as scorer:
        assert scorer.score([(ans(b), g) for b, g in FORMATTED_INTEGERS]) == [1.0] * len(FORMATTED_INTEGERS)


@pytest.mark.parametrize("boxed, gold", [
    # an expression stays refused, however it is dressed
    ("\\mathbf{\\frac{80}{2}}", "40"), ("{2^{10}}", "1024"), ("\\text{40 + 2}", "42"), ("{6 \\cdot 7}", "42"),
    # a list or a malformed group is not a thousands separator
    ("1,2", "12"), ("1{,}2", "12"), ("12,34", "1234"), ("1,2345", "12345"), ("1{,}23", "123"),
    ("6,70", "670"), ("{,}700", "700"),
    # wrong integers stay wrong
    ("{41}", "40"), ("\\mathbf{41}", "40"), ("6{,}701", "6700"), ("\\mathbf{-40}", "40"),
    # a wrapper that changes the meaning is not formatting
    ("\\sqrt{40}", "40"),
])
def test_formatting_does_not_make_a_wrong_or_unfinished_answer_right(boxed, gold):
    assert compute_score(ans(boxed), gold) == 0.0


@pytest.mark.parametrize("raw, expected", [
    ("{40}", "40"), ("\\mathbf{\\text{ 40 }}", "40"), ("6{,}700", "6700"), ("{a}{b}", "{a}{b}"),
    ("\\mathbf{v}+\\mathbf{w}", "\\mathbf{v}+\\mathbf{w}"), ("1{,}2", "1,2"), ("\\{1,2\\}", "\\{1,2\\}"),
])
def test_mathd_normalize_strips_formatting_of_the_whole_answer(raw, expected):
    assert mathd_normalize(raw) == expected
