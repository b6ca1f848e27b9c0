"""Problem sets: bundled benchmarks and train parts, file formats, bad records, the Hub cache, prompts."""

import hashlib
import json
import logging
import sys
from pathlib import Path

import pytest

from deepscaler import data
from deepscaler.data import (BENCHMARKS, PROMPT_SUFFIX, DataError, Problem, Skipped, build_prompts, format_prompt,
                             load_benchmark, load_problems, normalize_answers)

SHARED_DATA = Path("/work/shared/data")


def _write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _one_line(error):
    text = str(error.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- bundled


@pytest.mark.parametrize(
    "name, count, first_answer",
    [("aime2024", 30, "204"), ("math500", 500, None), ("amc", 83, "142"), ("minerva", 272, "9.6"),
     ("olympiad_bench", 675, "2")],
)
def test_every_benchmark_loads_with_its_record_count(name, count, first_answer):
    problems = load_benchmark(name)
    assert len(problems) == count
    assert all(isinstance(p.answer, str) and p.answer and p.answer == p.answer.strip() for p in problems)
    assert all(p.problem.strip() and p.source == name for p in problems)
    assert len({p.id for p in problems}) == count
    if first_answer is not None:
        assert problems[0].answer == first_answer


def test_benchmark_ids_use_the_records_own_ids():
    assert load_benchmark("math500")[0].id == "math500/test/precalculus/807.json"
    assert load_benchmark("olympiad_bench")[0].id == "olympiad_bench/1606"
    assert load_benchmark("minerva")[0].id == "minerva/9"  # the "idx" field
    assert load_benchmark("aime2024")[29].id == "aime2024/29"  # no id field: the index


def test_minerva_lists_are_alternative_forms_of_one_answer():
    by_id = {p.id: p for p in load_benchmark("minerva")}
    assert by_id["minerva/17"].answers == ("0.01", "0.02")
    assert by_id["minerva/56"].answers == ("11000",)  # "11000\n" and "11000" are one form
    assert sum(1 for p in by_id.values() if p.alternatives) == 40


def test_unknown_benchmark_lists_the_known_names():
    with pytest.raises(DataError) as error:
        load_benchmark("aime2025")
    assert all(name in _one_line(error) for name in BENCHMARKS)


OWN = {"additions.json"}  # written by this project (bundled/README.md), not a copy
# Git blob hashes of the upstream files (agentica-project/deepscaler at the commit that
# bundled/README.md names, directory deepscaler/data/), checked against the shared copies
# when they were bundled. `git hash-object` of a bundled file must give the same.
UPSTREAM_BLOBS = {
    "test/aime.json": "e1a705f2a03b9f8a0c4a2d334fc71eddc30bad7d",
    "test/amc.json": "ac11f74f22c4b79e9bf4aca53c885fcd35413749",
    "test/math.json": "0e3f122e6be5c99a0123adfdf4b4fe1bc8e861cc",
    "test/minerva.json": "01569be85b1df9007fa0bb4068a022da7606586b",
    "test/olympiad_bench.json": "efcd0ebe99a97294b9e1f0496ef2e6557c6eb924",
    "train/aime.json": "4b4fb24fca49106b34cc403b1c9211824a865d7c",
    "train/math.json": "c923136ffca0882f05e5c9ac4b210d5a1fecee4f",
}


def git_blob_hash(path: Path) -> str:
    """What ``git hash-object`` prints: sha1 of "blob <size>\\0" and the bytes."""
    content = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def test_bundled_files_are_byte_identical_to_the_upstream_copies():
    """Runs in CI: the hashes ship with the test, no folder outside the repository is read."""
    bundled = {p.relative_to(data.BUNDLED_DIR).as_posix(): p for p in data.BUNDLED_DIR.glob("*/*.json")
               if p.name not in OWN}
    assert sorted(bundled) == sorted(UPSTREAM_BLOBS)
    assert {rel: git_blob_hash(p) for rel, p in bundled.items()} == UPSTREAM_BLOBS


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no shared data folder: the hashes above hold the check")
def test_the_upstream_hashes_are_those_of_the_shared_copies():
    shared = {p.relative_to(SHARED_DATA).as_posix(): git_blob_hash(p) for p in SHARED_DATA.glob("*/*.json")}
    assert shared == UPSTREAM_BLOBS


def test_the_toy_additions_are_every_pair_of_digits_once():
    problems, skipped = load_problems("bundled:additions")
    assert skipped == [] and len(problems) == 100
    assert {(p.problem, p.answer) for p in problems} == {(f"What is {a} + {b}?", str(a + b))
                                                         for a in range(10) for b in range(10)}


def test_bundled_train_parts_skip_exactly_the_answerless_math_records(caplog):
    with caplog.at_level(logging.WARNING, logger="deepscaler.data"):
        problems, skipped = load_problems("bundled:math,aime")
    assert skipped == [
        Skipped("bundled:math", 886, "answer is null"),
        Skipped("bundled:math", 1009, "answer is null"),
        Skipped("bundled:math", 5328, "answer is empty"),
        Skipped("bundled:math", 5330, "answer is empty"),
    ]
    assert len(problems) == 7474 - 4 + 975
    assert problems[0].id == "bundled:math/0" and problems[-1].id == "bundled:aime/974"
    assert len({p.id for p in problems}) == len(problems)
    assert "bundled:math: skipped 4 of 7474 records" in caplog.text


def test_bundled_parts_concatenate_in_the_given_order():
    problems, skipped = load_problems("bundled:aime")
    assert (len(problems), skipped) == (975, [])
    assert problems[0].answer == "60"
    both, _ = load_problems("bundled:aime,math")
    assert both[:975] == problems and both[975].source == "bundled:math"


@pytest.mark.parametrize("spec", ["bundled:", "bundled:omni_math", "bundled:aime,still"])
def test_unknown_bundled_part_names_the_known_ones(spec):
    with pytest.raises(DataError) as error:
        load_problems(spec)
    assert "aime, math" in _one_line(error)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("204", "204"),
        ("  9.6\n", "9.6"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        (142.0, "142"),
        (0.5, "0.5"),
        (-3.0, "-3"),
        (1e-7, "0.0000001"),
        (7, "7"),
        (["9.6\n"], "9.6"),
        (["0.01\n", "0.02\n"], "0.01"),
        ([None, " ", "5"], "5"),
        (None, None),
        ("", None),
        (" \n", None),
        ([], None),
        ([None, ""], None),
        (float("nan"), None),
        (float("inf"), None),
        (True, None),
        ({"value": 1}, None),
    ],
)
def test_the_primary_answer_form_of_every_shape(raw, expected):
    assert (normalize_answers(raw) or (None,))[0] == expected


def test_normalize_answers_keeps_distinct_alternatives_in_order():
    assert normalize_answers(["0.01\n", "0.02\n"]) == ("0.01", "0.02")
    assert normalize_answers(["11000\n", "11000"]) == ("11000",)
    assert normalize_answers([["a"], "b", 3.0]) == ("a", "b", "3")
    assert normalize_answers(None) == ()


def test_problem_answers_lists_the_primary_form_first():
    problem = Problem("s/0", "p", "1", "s", ("1.0",))
    assert problem.answers == ("1", "1.0")
    assert Problem("s/1", "p", "2", "s").answers == ("2",)


# --------------------------------------------------------------------------- local files

RECORDS = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 2+2?", "answer": 4.0}]


def test_json_array_file(tmp_path):
    problems, skipped = load_problems(str(_write_json(tmp_path / "mine.json", RECORDS)))
    assert skipped == []
    assert [(p.id, p.answer, p.source) for p in problems] == [("mine/0", "2", "mine"), ("mine/1", "4", "mine")]


def test_jsonl_file_and_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", RECORDS)
    path.write_text(path.read_text() + "\n\n")
    problems, _ = load_problems(str(path))
    assert [p.problem for p in problems] == ["What is 1+1?", "What is 2+2?"]


def test_json_file_holding_json_lines_is_accepted(tmp_path):
    problems, _ = load_problems(str(_write_jsonl(tmp_path / "lines.json", RECORDS)))
    assert len(problems) == 2


def test_own_unique_ids_are_used_when_unique(tmp_path):
    unique = [dict(r, id=f"q{i}") for i, r in enumerate(RECORDS)]
    assert [p.id for p in load_problems(str(_write_json(tmp_path / "u.json", unique)))[0]] == ["u/q0", "u/q1"]
    clash = [dict(r, id="same") for r in RECORDS]
    assert [p.id for p in load_problems(str(_write_json(tmp_path / "c.json", clash)))[0]] == ["c/0", "c/1"]


def test_directory_loads_every_data_file_in_path_order(tmp_path):
    _write_json(tmp_path / "b.json", RECORDS[:1])
    (tmp_path / "a").mkdir()
    _write_jsonl(tmp_path / "a" / "part.jsonl", RECORDS[1:])
    _write_json(tmp_path / "dataset_info.json", {"not": "records"})
    (tmp_path / "README.md").write_text("# not data")
    problems, _ = load_problems(str(tmp_path))
    assert [p.id for p in problems] == ["a/part/0", "b/0"]


def test_directory_with_split_names_loads_only_the_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", RECORDS)
    _write_jsonl(tmp_path / "test.jsonl", RECORDS[:1])
    assert len(load_problems(str(tmp_path))[0]) == 2
    assert len(load_problems(str(tmp_path), split="test")[0]) == 1


def test_broken_records_are_skipped_and_counted_with_their_index(tmp_path, caplog):
    records = [
        [1, 2],
        "text",
        {"answer": "1"},
        {"problem": "  ", "answer": "1"},
        {"problem": "p", "answer": None},
        {"problem": "p"},
        {"problem": "p", "answer": ""},
        {"problem": "p", "answer": []},
        {"problem": "ok", "answer": 3.0},
    ]
    with caplog.at_level(logging.WARNING, logger="deepscaler.data"):
        problems, skipped = load_problems(str(_write_json(tmp_path / "bad.json", records)))
    assert [(p.id, p.answer) for p in problems] == [("bad/8", "3")]
    assert [(s.index, s.reason) for s in skipped] == [
        (0, "not an object (list)"),
        (1, "not an object (str)"),
        (2, "no problem text"),
        (3, "no problem text"),
        (4, "answer is null"),
        (5, "answer missing"),
        (6, "answer is empty"),
        (7, "answer is empty"),
    ]
    assert "bad: skipped 8 of 9 records" in caplog.text


def test_a_file_with_no_usable_problem_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable problems"):
        load_problems(str(_write_json(tmp_path / "none.json", [{"question": "q", "answer": "1"}])))


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"problem": "p", "answer": "1"},\n{"problem": ')
    with pytest.raises(DataError) as error:
        load_problems(str(path))
    assert str(path) in _one_line(error) and "line 2" in _one_line(error)


def test_invalid_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": oops}\n')
    with pytest.raises(DataError) as error:
        load_problems(str(path))
    assert _one_line(error).startswith(f"{path}: line 2: invalid JSON")


def test_json_that_is_not_an_array_is_an_error(tmp_path):
    with pytest.raises(DataError, match="expected a JSON array"):
        load_problems(str(_write_json(tmp_path / "obj.json", {"problem": "p", "answer": "1"})))


def test_parquet_without_pyarrow_is_a_one_line_error(tmp_path, monkeypatch):
    # pyarrow is an optional dependency: make it unimportable, as on an install without it.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError) as error:
        load_problems(str(path))
    assert "pyarrow" in _one_line(error) and str(path) in _one_line(error)


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A parquet column has one type; a float answer column is normalised like JSON floats.
    table = pa.table({"problem": ["What is 1+1?", "What is 2+2?"], "answer": [2.0, 4.5]})
    pq.write_table(table, tmp_path / "train.parquet")
    assert [p.answer for p in load_problems(str(tmp_path / "train.parquet"))[0]] == ["2", "4.5"]


@pytest.mark.parametrize("source", ["missing/data.json", "./nowhere", "/no/such/dir", "plain-name"])
def test_missing_path_that_is_no_repo_id_is_named(source):
    with pytest.raises(DataError) as error:
        load_problems(source)
    assert repr(source) in _one_line(error)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no .* data files"):
        load_problems(str(tmp_path))


# --------------------------------------------------------------------------- the Hub (stand-in)


def _fake_hub_cache(cache_dir, repo_id, files):
    """A stand-in for the Hugging Face Hub, the one boundary these tests cannot reach:
    a dataset snapshot laid out exactly as huggingface_hub caches it."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"datasets--{repo_id.replace('/', '--')}"
    for name, records in files.items():
        path = repo / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, records) if name.endswith(".jsonl") else _write_json(path, records)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)  # no newline, as the Hub writes it


def test_hub_dataset_loads_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(tmp_path, "fake-org/Tiny-Math", {"deepscaler.json": RECORDS})
    problems, skipped = load_problems("fake-org/Tiny-Math", cache_dir=str(tmp_path))
    assert skipped == []
    assert [p.id for p in problems] == ["fake-org/Tiny-Math/deepscaler/0", "fake-org/Tiny-Math/deepscaler/1"]
    assert problems[1].answer == "4"


def test_hub_dataset_split_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {"data/train-00000-of-00001.jsonl": RECORDS, "data/test-00000-of-00001.jsonl": RECORDS[:1]}
    _fake_hub_cache(tmp_path, "fake-org/split-math", files)
    assert len(load_problems("fake-org/split-math", cache_dir=str(tmp_path))[0]) == 2
    assert len(load_problems("fake-org/split-math", cache_dir=str(tmp_path), split="test")[0]) == 1


def test_hub_dataset_not_cached_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as error:
        load_problems("agentica-org/DeepScaleR-Preview-Dataset", cache_dir=str(tmp_path))
    assert "'agentica-org/DeepScaleR-Preview-Dataset'" in _one_line(error)


# --------------------------------------------------------------------------- prompts


def test_prompt_is_the_problem_and_suffix_in_the_chat_template(tiny_tokenizer):
    assert PROMPT_SUFFIX == " Let's think step by step and output the final answer within \\boxed{}."
    problem = "What is $1+1$?"
    assert format_prompt(problem, tiny_tokenizer) == (
        "<｜begin▁of▁sentence｜><｜User｜>What is $1+1$? Let's think step by step and output the final"
        " answer within \\boxed{}.<｜Assistant｜><think>\n"
    )


def test_prompt_token_ids_start_with_one_bos(tiny_tokenizer):
    problem = load_benchmark("aime2024")[0]
    (kept, prompt, ids), = build_prompts([problem], tiny_tokenizer, 1024)[0]
    assert kept is problem and prompt == format_prompt(problem.problem, tiny_tokenizer)
    assert ids == tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert tiny_tokenizer.decode(ids) == prompt


def test_overlong_prompts_are_dropped_and_counted(tiny_tokenizer, caplog):
    short = Problem("t/0", "What is 1+1?", "2", "t")
    long = Problem("t/1", "Compute " + " + ".join(["123"] * 400) + ".", "49200", "t")
    limit = len(build_prompts([short], tiny_tokenizer, 10**6)[0][0][2])
    with caplog.at_level(logging.WARNING, logger="deepscaler.data"):
        kept, dropped = build_prompts([short, long, short], tiny_tokenizer, limit)
    assert [k[0] for k in kept] == [short, short] and dropped == 1
    assert "dropped 1 of 3 prompts over" in caplog.text
    assert build_prompts([short], tiny_tokenizer, limit - 1) == ([], 1)
    assert build_prompts([], tiny_tokenizer, limit) == ([], 0)
