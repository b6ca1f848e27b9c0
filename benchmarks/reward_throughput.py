"""How much faster is ``BatchScorer`` than a plain ``compute_score`` loop?

    python -m benchmarks.reward_throughput [--n 2000] [--data-dir DIR] [--workers W]
                                           [--adversarial 3] [--seed 0]

Builds ``n`` distinct, seeded (response, ground truth) pairs from the bundled problems
(test and train JSON): right answers in varied spellings (as the gold, ``\\dfrac``, ``x = ``,
decimals for fractions, ``142.0``, thousands commas, units, ``\\left(``...), wrong answers
(near misses and other problems' answers), a few kB of filler reasoning before ``</think>``
(about half of them), responses cut off before ``</think>``, and ``--adversarial`` answers
such as ``\\boxed{9^{9^{9^9}}}``. No two pairs have the same (answer, gold) strings, so
math-verify's caches cannot make either side look faster.

Then it scores them twice: with ``BatchScorer`` (workers = CPU count by default, the default
10 s deadline; pool start-up is timed separately and left out of the rate, since the
orchestrator keeps one pool for the whole run) and with a plain loop in this process.

Order and caches: the batch runs first. Its grading happens in workers forked from
multiprocessing's forkserver, which never graded anything, so it warms no cache of this
process; the loop then starts with this process's caches cold as well. Both see the same
items in the same order. The two result lists are compared item by item.

Prints responses/s for both, the scorer's slowest item and its timeout/crash counts, and ends
with exactly one JSON line:
    {"n", "loop_per_s", "batch_per_s", "ratio", "workers", "max_item_s", "timeouts", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from benchmarks.harness import record
from deepscaler.reward import BatchScorer, compute_score, extract_answer, gold_answers

REPO = Path(__file__).resolve().parent.parent

ADVERSARIAL = ["9^{9^{9^9}}", "2^{10^{10}}", "10^{10^{10}}!", "(10^{100})!", "\\frac{7^{7^{7^7}}}{3}"]
FILLER = [
    "Let me reconsider the constraints once more.",
    "We can substitute the value back to check it.",
    "Hmm, wait, that does not look right; let me recompute the middle step.",
    "So the expression simplifies after expanding the product.",
    "Consider the case where the variable is negative separately.",
    "By symmetry the two remaining terms must be equal.",
    "Double-checking with a small example gives the same pattern.",
    "Therefore the sum telescopes and only the endpoints remain.",
]


def default_data_dir() -> Path:
    bundled = REPO / "deepscaler" / "bundled"
    return bundled if bundled.is_dir() else (REPO.parent / "shared" / "data")


def load_golds(data_dir: Path) -> list[tuple[str, object]]:
    """(problem text, raw answer) of every record with a usable answer."""
    records = []
    for path in sorted(data_dir.glob("test/*.json")) + sorted(data_dir.glob("train/*.json")):
        for r in json.loads(path.read_text(encoding="utf-8")):
            if isinstance(r, dict) and isinstance(r.get("problem"), str) and gold_answers(r.get("answer")):
                records.append((r["problem"], r["answer"]))
    if not records:
        raise SystemExit(f"no problems under {data_dir}")
    return records


def right_variants(gold: str) -> list[str]:
    """Correct answers in the spellings models use."""
    out = [gold]
    if "\\frac" in gold:
        out.append(gold.replace("\\frac", "\\dfrac"))
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m and int(m.group(3)) in (2, 4, 5, 8, 10, 20, 25):
        value = int(m.group(2)) / int(m.group(3)) * (-1 if m.group(1) else 1)
        out.append(repr(value))
        out.append(f"{m.group(1)}{m.group(2)}/{m.group(3)}")
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        out += [f"{n}.0", f"x = {n}", f"{n} \\text{{ units}}"]
        if abs(n) >= 1000:
            out.append(f"{n:,}")
    if re.fullmatch(r"-?\d+\.\d+", gold):
        out.append(gold + "0")
    if gold.startswith("(") and gold.endswith(")"):
        out.append("\\left" + gold[:-1] + "\\right)")
    if len(gold) < 40 and not gold.startswith("\\text"):
        out.append(f"{gold}.")  # trailing period inside the box
    return out


def wrong_variants(gold: str, rng: random.Random, other_gold: str) -> list[str]:
    out = [other_gold]
    if re.fullmatch(r"-?\d+", gold):
        n = int(gold)
        out += [str(n + rng.choice([-2, -1, 1, 2, 10])), str(-n) if n else "1"]
    m = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        out.append(f"\\frac{{{m.group(2)}}}{{{m.group(1)}}}")
    out.append(gold + "+1")
    return out


def reasoning(rng: random.Random, problem: str, size: int) -> str:
    parts = [f"We need to solve: {problem[:300]}"]
    while sum(len(p) for p in parts) < size:
        parts.append(rng.choice(FILLER))
    return " ".join(parts)


def build_pairs(n: int, data_dir: Path, seed: int, adversarial: int) -> tuple[list[tuple[str, object]], dict]:
    rng = random.Random(seed)
    records = load_golds(data_dir)
    rng.shuffle(records)
    pairs: list[tuple[str, object]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    kinds: dict[str, int] = {}
    for a in ADVERSARIAL[:adversarial]:
        pairs.append((f"<think>{reasoning(rng, 'a hard one', 500)}</think> So \\boxed{{{a}}}.", "2"))
        kinds["adversarial"] = kinds.get("adversarial", 0) + 1
    i = 0
    while len(pairs) < n:
        problem, raw = records[i % len(records)]
        i += 1
        golds = gold_answers(raw)
        gold = golds[0]
        kind = rng.choices(["right", "wrong", "unfinished"], weights=[50, 44, 6])[0]
        if kind == "right":
            answer = rng.choice(right_variants(gold))
        elif kind == "wrong":
            other = gold_answers(records[rng.randrange(len(records))][1])[0]
            answer = rng.choice(wrong_variants(gold, rng, other))
        else:
            answer = gold
        long_ = rng.random() < 0.5
        think = reasoning(rng, problem, rng.randint(2000, 6000) if long_ else rng.randint(100, 600))
        opening = "<think>\n" if rng.random() < 0.5 else ""  # newer template puts <think> in the prompt
        box = f"$\\boxed{{{answer}}}$" if rng.random() < 0.5 else f"\\[\\boxed{{{answer}}}\\]"
        if kind == "unfinished":
            response = opening + think + " ... so far it looks like " + box  # cut off: no </think>
            key = (response, golds)
        else:
            response = f"{opening}{think}\n</think>\n\nThe final answer is {box}"
            key = (extract_answer(response) or "", golds)
        if key in seen:
            continue
        seen.add(key)
        pairs.append((response, raw))
        kinds[kind] = kinds.get(kind, 0) + 1
    rng.shuffle(pairs)
    return pairs, kinds


def proc_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a live process (Linux /proc), 0.0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--adversarial", type=int, default=3, help=f"at most {len(ADVERSARIAL)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pairs, kinds = build_pairs(args.n, args.data_dir, args.seed, args.adversarial)
    kb = sum(len(r) for r, _ in pairs) / len(pairs) / 1024
    print(f"{len(pairs)} pairs from {args.data_dir} ({kinds}), mean response {kb:.1f} kB")

    t0 = time.perf_counter()
    with BatchScorer(workers=args.workers) as scorer:
        startup_s = time.perf_counter() - t0
        cpu0 = {pid: proc_cpu_s(pid) for pid in scorer.pids}
        parent0 = time.process_time()
        t0 = time.perf_counter()
        batch = scorer.score(pairs)
        batch_s = time.perf_counter() - t0
        # CPU of the workers alive at the end (a replaced worker's CPU is not counted).
        batch_cpu_s = time.process_time() - parent0 + sum(
            proc_cpu_s(pid) - cpu0.get(pid, 0.0) for pid in scorer.pids)
        stats = scorer.stats

    t0, cpu0_loop = time.perf_counter(), time.process_time()
    loop = [compute_score(r, g) for r, g in pairs]
    loop_s = time.perf_counter() - t0
    loop_cpu_s = time.process_time() - cpu0_loop

    disagree = sum(a != b for a, b in zip(batch, loop))
    result = {
        "n": len(pairs),
        "loop_per_s": round(len(pairs) / loop_s, 1),
        "batch_per_s": round(len(pairs) / batch_s, 1),
        "ratio": round(loop_s / batch_s, 2),
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "loop_s": round(loop_s, 2),
        "batch_s": round(batch_s, 2),
        "pool_startup_s": round(startup_s, 2),
        # CPU seconds spent: near-equal means the pool adds no work, and the ratio is bounded
        # by how many cores were free (the machine's load average is printed too).
        "loop_cpu_s": round(loop_cpu_s, 2),
        "batch_cpu_s": round(batch_cpu_s, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "max_item_s": round(stats.max_item_s, 2),
        "timeouts": stats.timeouts,
        "crashes": stats.crashes,
        "adversarial": kinds.get("adversarial", 0),
        "mean_reward": round(sum(batch) / len(batch), 3),
        "disagreements": disagree,
        "seed": args.seed,
    }
    print(f"plain loop : {result['loop_per_s']:8.1f} responses/s ({loop_s:.2f} s)")
    print(f"BatchScorer: {result['batch_per_s']:8.1f} responses/s ({batch_s:.2f} s, {args.workers} workers, "
          f"pool start {startup_s:.2f} s)")
    print(f"ratio {result['ratio']}x; slowest item {stats.max_item_s:.2f} s; timeouts {stats.timeouts}, "
          f"crashes {stats.crashes}; batch/loop disagreements {disagree}")
    print(f"CPU seconds: loop {loop_cpu_s:.2f}, batch {batch_cpu_s:.2f} (workers + this process); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    record("reward_throughput", vars(args), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
