"""Problem sets: bundled benchmarks, training data (bundled, local files or the Hub), prompts.

Why one module: every consumer (orchestrator, eval, tiny preset) must see the same problem
text, the same answer form and the same prompt, or rewards and pass@1 drift between them.

Policy for bad records: a record with no usable answer or no problem text is skipped and
counted (with its index and reason), never a crash, because real data files carry a few
(MATH train has 2 null and 2 empty answers). A file that is not valid JSON is an error: one
line naming the file (and the line for JSON Lines).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

log = logging.getLogger("deepscaler.data")

# DeepScaleR's instruction, appended to the problem text as is (docs/reproduction.md).
PROMPT_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BENCHMARKS = {
    "math500": "test/math.json",
    "aime2024": "test/aime.json",
    "amc": "test/amc.json",
    "minerva": "test/minerva.json",
    "olympiad_bench": "test/olympiad_bench.json",
}
BUNDLED_PREFIX = "bundled:"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
# JSON files a dataset folder may hold that are not records.
_METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
# Fields that may carry a record's own stable id, in order of preference.
_ID_FIELDS = ("unique_id", "id", "idx")
# A Hugging Face repository id: "name" or "owner/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DataError(ValueError):
    """A data source that cannot be read. The message is one line."""


@dataclass(frozen=True)
class Problem:
    """One problem. ``answer`` is the primary reference answer; ``alternatives`` are other
    accepted forms of the same answer (Minerva lists several), so the reward should accept
    a response matching any of ``answers``."""

    id: str
    problem: str
    answer: str
    source: str
    alternatives: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        """Every accepted form, primary first."""
        return (self.answer, *self.alternatives)


class Skipped(NamedTuple):
    """A record left out on load: where it was and why."""

    source: str
    index: int
    reason: str


# --------------------------------------------------------------------------- answers


def _float_text(x: float) -> str | None:
    """142.0 -> "142", 0.5 -> "0.5", 1e-07 -> "0.0000001"; NaN/inf are no answer."""
    if not math.isfinite(x):
        return None
    if x.is_integer():
        return str(int(x))
    text = repr(x)
    return format(Decimal(text), "f") if "e" in text else text


def normalize_answers(raw: Any) -> tuple[str, ...]:
    """Every accepted form of a raw answer, as stripped strings; () when there is none.

    Why: the files store answers as str (with stray newlines), float (AMC: 142.0) or a list
    of str (OlympiadBench, Minerva). In Minerva a list of 2-3 items holds alternative forms
    of ONE answer (``["0.01", "0.02"]``, ``["11000\\n", "11000"]``), and DeepScaleR's reward
    accepts a match with any of them, so a list is alternatives, never a tuple to join.
    """
    if raw is None or isinstance(raw, bool):
        return ()
    if isinstance(raw, str):
        text = raw.strip()
        return (text,) if text else ()
    if isinstance(raw, numbers.Integral):
        return (str(int(raw)),)
    if isinstance(raw, numbers.Real):
        text = _float_text(float(raw))
        return (text,) if text else ()
    if isinstance(raw, (list, tuple)):
        forms: list[str] = []
        for item in raw:
            forms += [f for f in normalize_answers(item) if f not in forms]
        return tuple(forms)
    return ()


# --------------------------------------------------------------------------- records


def _check_record(record: Any) -> tuple[str | None, tuple[str, ...]]:
    """(skip reason or None, answer forms) for one raw record."""
    if not isinstance(record, dict):
        return f"not an object ({type(record).__name__})", ()
    text = record.get("problem")
    if not isinstance(text, str) or not text.strip():
        return "no problem text", ()
    if "answer" not in record:
        return "answer missing", ()
    forms = normalize_answers(record["answer"])
    if not forms:
        return ("answer is null" if record["answer"] is None else "answer is empty"), ()
    return None, forms


def _id_field(records: Sequence[Any]) -> str | None:
    """A field that gives every object record a unique id, so ids survive reordering."""
    objects = [r for r in records if isinstance(r, dict)]
    for name in _ID_FIELDS:
        values = [r.get(name) for r in objects]
        if objects and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            if len({str(v) for v in values}) == len(values):
                return name
    return None


def parse_records(records: Sequence[Any], source: str) -> tuple[list[Problem], list[Skipped]]:
    """Turn raw records into Problems; ids are ``<source>/<own id or index>``."""
    key = _id_field(records)
    problems, skipped = [], []
    for index, record in enumerate(records):
        reason, forms = _check_record(record)
        if reason:
            skipped.append(Skipped(source, index, reason))
            continue
        local = record[key] if key else index
        problems.append(Problem(f"{source}/{local}", record["problem"], forms[0], source, forms[1:]))
    _log_load(source, len(records), skipped)
    return problems, skipped


def _log_load(source: str, total: int, skipped: list[Skipped]) -> None:
    """One line per file: how many records were kept and which were skipped."""
    if not skipped:
        log.info("%s: loaded %d records", source, total)
        return
    sample = ", ".join(f"#{s.index} {s.reason}" for s in skipped[:5])
    more = f", ... {len(skipped) - 5} more" if len(skipped) > 5 else ""
    log.warning("%s: skipped %d of %d records (%s%s)", source, len(skipped), total, sample, more)


# --------------------------------------------------------------------------- files


def _json_lines(path: Path, text: str) -> list[Any]:
    """One JSON value per non-blank line; a bad line is an error naming file and line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: invalid JSON ({e.msg})") from None
    return records


def _json_array(path: Path, text: str) -> list[Any]:
    """A JSON array; a ``.json`` file holding JSON Lines (as on the Hub) is accepted too."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _json_lines(path, text)
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _parquet(path: Path) -> list[Any]:
    """Rows of a parquet file as dicts (needs pyarrow, which is optional)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs the 'pyarrow' package (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})".splitlines()[0]) from None


def read_records(path: str | Path) -> list[Any]:
    """Raw records of a ``.json`` (array), ``.jsonl`` or ``.parquet`` file."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _parquet(path)
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})".splitlines()[0]) from None
    return _json_lines(path, text) if path.suffix == ".jsonl" else _json_array(path, text)


def load_file(path: str | Path, source: str | None = None) -> tuple[list[Problem], list[Skipped]]:
    """Problems of one data file; ``source`` (default: file stem) prefixes the ids."""
    path = Path(path)
    return parse_records(read_records(path), source or path.stem)


def _matches_split(rel: Path, split: str) -> bool:
    """Hub naming conventions: ``train.jsonl``, ``train-00000-of-00001.parquet``, ``train/x.json``."""
    names = [*rel.parent.parts, rel.name.split(".")[0]]
    return any(n == split or n.startswith((f"{split}-", f"{split}_")) for n in names)


def data_files(directory: str | Path, split: str | None = "train") -> list[Path]:
    """Data files under a folder, sorted; only the split's files when the names mark splits."""
    root = Path(directory)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix in DATA_SUFFIXES
        and p.is_file()
        and p.name not in _METADATA_FILES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if split:
        chosen = [p for p in files if _matches_split(p.relative_to(root), split)]
        files = chosen or files
    return files


def load_directory(
    directory: str | Path, *, split: str | None = "train", prefix: str = ""
) -> tuple[list[Problem], list[Skipped]]:
    """Every data file of a folder, concatenated in path order; sources are relative paths."""
    root = Path(directory)
    files = data_files(root, split)
    if not files:
        raise DataError(f"{root}: no {', '.join(DATA_SUFFIXES)} data files in this folder")
    problems: list[Problem] = []
    skipped: list[Skipped] = []
    for path in files:
        rel = path.relative_to(root).with_suffix("").as_posix()
        got, lost = load_file(path, prefix + rel)
        problems += got
        skipped += lost
    return problems, skipped


# --------------------------------------------------------------------------- named sources


def load_benchmark(name: str) -> list[Problem]:
    """A bundled evaluation set by name (no network); skipped records are logged."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    problems, _ = load_file(BUNDLED_DIR / BENCHMARKS[name], name)
    return problems


def bundled_train_parts() -> list[str]:
    """Names usable after ``bundled:`` (the training parts shipped with the package)."""
    return sorted(p.stem for p in (BUNDLED_DIR / "train").glob("*.json"))


def _load_bundled(spec: str) -> tuple[list[Problem], list[Skipped]]:
    """``bundled:math,aime`` -> those training parts, concatenated in the given order."""
    names = [n.strip() for n in spec[len(BUNDLED_PREFIX) :].split(",") if n.strip()]
    known = bundled_train_parts()
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise DataError(f"bad bundled source {spec!r}: parts must be a comma list of {', '.join(known)}")
    problems: list[Problem] = []
    skipped: list[Skipped] = []
    for name in names:
        got, lost = load_file(BUNDLED_DIR / "train" / f"{name}.json", BUNDLED_PREFIX + name)
        problems += got
        skipped += lost
    return problems, skipped


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_dataset(repo_id: str, cache_dir: str | None = None) -> Path:
    """The data files of a Hub dataset, from the cache or downloaded into it."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            repo_type="dataset",
            cache_dir=cache_dir,
            allow_patterns=[f"*{s}" for s in DATA_SUFFIXES],
            local_files_only=_hub_offline(),
        )
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise DataError(
            f"{repo_id!r} is no local path, and the Hugging Face Hub dataset of that id cannot be had "
            f"(cache_dir={cache_dir}, offline={_hub_offline()}): {type(e).__name__}: {first}"
        ) from None
    return Path(folder)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is spelled like a Hugging Face repository id ("name" or "owner/name")."""
    return bool(_HUB_ID.match(text))


def looks_like_repo_id(source: str) -> bool:
    """``org/name`` with no file suffix: a Hub dataset id rather than a mistyped path."""
    return is_hub_id(source) and "/" in source and "--" not in source and not source.endswith(DATA_SUFFIXES)


def load_problems(
    source: str, *, cache_dir: str | None = None, split: str = "train"
) -> tuple[list[Problem], list[Skipped]]:
    """Training problems from ``bundled:<parts>``, a local file/folder, or a Hub dataset id.

    Returns ``(problems, skipped)``; ``len(skipped)`` is the skipped count, each entry says
    where and why. ``split`` picks files in folders whose names mark splits.
    """
    if source.startswith(BUNDLED_PREFIX):
        problems, skipped = _load_bundled(source)
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        problems, skipped = load_directory(path, split=split) if path.is_dir() else load_file(path)
    elif looks_like_repo_id(source):
        problems, skipped = load_directory(download_dataset(source, cache_dir), split=split, prefix=f"{source}/")
    else:
        raise DataError(f"no such file or folder, and not a Hugging Face dataset id (org/name): {source!r}")
    if not problems:
        raise DataError(f"{source}: no usable problems ({len(skipped)} records skipped)")
    return problems, skipped


# --------------------------------------------------------------------------- prompts


def format_prompt(problem_text: str, tokenizer: Any) -> str:
    """The model's chat template over one user turn (problem + suffix), no system prompt."""
    messages = [{"role": "user", "content": problem_text + PROMPT_SUFFIX}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompts(
    problems: Iterable[Problem], tokenizer: Any, max_prompt_tokens: int
) -> tuple[list[tuple[Problem, str, list[int]]], int]:
    """(problem, prompt, token ids) for each prompt within the limit, and the dropped count.

    Ids are encoded without adding special tokens: the template already wrote bos, and this
    is how vLLM's chat endpoint tokenizes a rendered template too.
    """
    problems = list(problems)
    prompts = [format_prompt(p.problem, tokenizer) for p in problems]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    kept = [(p, s, list(t)) for p, s, t in zip(problems, prompts, ids) if len(t) <= max_prompt_tokens]
    dropped = len(problems) - len(kept)
    if dropped:
        log.warning("dropped %d of %d prompts over %d tokens", dropped, len(problems), max_prompt_tokens)
    return kept, dropped
