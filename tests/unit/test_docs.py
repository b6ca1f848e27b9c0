"""The user docs against the code: the generated config reference is current, and every command,
flag, config key and link in the guides exists."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

import yaml

from deepscaler import configdoc
from deepscaler.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
GUIDES = ["quickstart.md", "cluster.md", "troubleshooting.md", "reproduction.md"]
SECTIONS = {f.name for f in dataclasses.fields(Config)}
FILE_SUFFIXES = (".yaml", ".md", ".png", ".safetensors", ".json", ".jsonl", ".py", ".log", ".sbatch", ".sh")


# --------------------------------------------------------------------------- the generated reference


def test_config_reference_is_current():
    committed = (DOCS / "config-reference.md").read_text(encoding="utf-8")
    assert committed == configdoc.render(), (
        f"docs/config-reference.md is stale; regenerate it with: {configdoc.REGENERATE}")


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, path + ".")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            out.append(path)
            out += leaf_keys(typing.get_args(tp)[1], path + ".<name>.")
        else:
            out.append(path)
    return out


def test_reference_lists_every_key_once():
    text = configdoc.render()
    rows = re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)
    assert sorted(rows) == sorted(leaf_keys())


@dataclasses.dataclass
class _Uncommented:
    plain: int = 1


def test_comments_are_read_from_the_source():
    from deepscaler.config import ComponentResources, RewardConfig, RunConfig

    run = configdoc.field_comments(RunConfig)
    assert run["max_steps"] == "Steps to run in this stage (None: until the data is used up)."  # the line above
    assert configdoc.field_comments(_Uncommented) == {}  # no comment: none invented
    assert configdoc.field_comments(RewardConfig)["workers"] == "0: one per CPU the orchestrator may use"  # at the end of the line
    assert configdoc.field_comments(ComponentResources)["mem"].startswith('e.g. "200G"')


def test_reference_shows_defaults_and_the_stage_files():
    text = configdoc.render()
    row = next(line for line in text.splitlines() if line.startswith("| `sampling.max_response_tokens` |"))
    assert "| `8192` |" in row
    assert "stage2.yaml: `16384` (paper: " in row  # the value, and the comment of its line
    assert "tiny-random.yaml: `64`" in row
    # Defaults come from an instance: eval.resources has its own, not ComponentResources'.
    row = next(line for line in text.splitlines() if line.startswith("| `eval.resources.gpus_per_node` |"))
    assert "| `1` |" in row


def test_yaml_line_comments():
    text = "a:\n  b: 1   # first\n  c: 'x # not a comment'\n  d: {e: 2}  # flow\nf: 3\n"
    assert configdoc.yaml_line_comments(text) == {"a.b": "first", "a.d": "flow"}


def test_check_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(configdoc, "REFERENCE", tmp_path / "config-reference.md")
    assert configdoc.main(["--check"]) == 1
    assert "python -m deepscaler.configdoc --write" in capsys.readouterr().err
    assert configdoc.main(["--write"]) == 0
    assert configdoc.main(["--check"]) == 0


# --------------------------------------------------------------------------- commands in the guides


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def doc_commands() -> list[tuple[str, str]]:
    """(guide, command) for every ``python -m deepscaler.*`` command of the guides: in bash
    blocks (continuation lines joined) and in inline code."""
    out = []
    for name in GUIDES:
        text = (DOCS / name).read_text(encoding="utf-8")
        for block in fenced_blocks(text, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                if "python -m deepscaler." in line:
                    out.append((name, line[line.index("python -m deepscaler."):]))
        for span in re.findall(r"`(python -m deepscaler\.[^`]+)`", text):
            out.append((name, span))
    return out


def test_the_guides_have_commands():
    assert len(doc_commands()) >= 20


def _help(module: str, sub: str | None, capsys) -> str:
    import importlib

    # the eval package's command line is its cli module (python -m runs __main__, which calls it)
    main = importlib.import_module(f"deepscaler.{module}" + (".cli" if module == "eval" else "")).main
    with pytest.raises(SystemExit):
        main([sub, "--help"] if sub else ["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("guide,command", doc_commands(), ids=lambda x: x[:60] if isinstance(x, str) else x)
def test_documented_commands_exist(guide, command, capsys):
    tokens = shlex.split(command, comments=True)
    module = tokens[2].removeprefix("deepscaler.")
    sub = tokens[3] if module == "eval" and len(tokens) > 3 else None
    if sub is not None:
        assert sub in ("run", "sweep", "report", "steps"), f"{guide}: {command}"
    help_text = _help(module, sub, capsys)
    for token in tokens[3:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", help_text), f"{guide}: {flag} is no option of {command}"
        elif re.match(r"^[a-z_]+(\.[A-Za-z0-9_]+)+=", token):
            check_override(token, f"{guide}: {command}")


def check_override(text: str, where: str) -> None:
    value = text.split("=", 1)[1]
    if re.fullmatch(r"[A-Z]+|\$\w+|N|K", value):  # a placeholder: check the key only
        assert_config_key(text.split("=", 1)[0], where)
        return
    try:
        load_config(["stage1"], [text])
    except ConfigError as e:
        pytest.fail(f"{where}: {e}")


def assert_config_key(path: str, where: str) -> None:
    tp: typing.Any = Config
    for part in path.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            assert part in hints, f"{where}: '{path}' is no config key"
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            pytest.fail(f"{where}: '{path}' goes below a plain value")


def test_config_keys_named_in_the_guides_exist():
    """Every backticked ``section.key`` (or ``section.key=value``) of the guides is a config key."""
    for name in GUIDES:
        text = (DOCS / name).read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\s]+)`", text):
            key = span.split("=", 1)[0]
            if key.split(".")[0] not in SECTIONS or "." not in key or key.endswith(FILE_SUFFIXES):
                continue
            if re.search(r"[{}/<*]", key):
                continue
            assert_config_key(key, name)
            if "=" in span and not re.search(r"=(\$|[A-Z]+$|N$)", span):
                check_override(span, name)


def test_yaml_examples_are_valid_configs(tmp_path):
    for name in GUIDES:
        for i, block in enumerate(fenced_blocks((DOCS / name).read_text(encoding="utf-8"), "yaml")):
            path = tmp_path / f"{name}-{i}.yaml"
            path.write_text(block)
            assert isinstance(yaml.safe_load(block), dict), f"{name} yaml block {i}"
            try:
                load_config(["stage1", path])
            except ConfigError as e:
                pytest.fail(f"{name} yaml block {i}: {e}")


# --------------------------------------------------------------------------- the quickstart's tested blocks


def marked_blocks(marker: str) -> list[str]:
    """The commands of the bash blocks right after ``<!-- test: MARKER -->`` in quickstart.md."""
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(rf"<!-- test: {marker} -->\n```bash\n(.*?)^```", text, flags=re.M | re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("marker", ["local", "slurm"])
def test_quickstart_marks_its_tested_blocks(marker):
    lines = marked_blocks(marker)
    assert lines, f"no <!-- test: {marker} --> block in docs/quickstart.md"
    assert all(line.startswith("python -m deepscaler.") for line in lines), lines


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.parametrize("name", GUIDES + ["config-reference.md", "config.md"])
def test_relative_links_resolve(name):
    text = (DOCS / name).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (DOCS / path).resolve() if path else DOCS / name
        assert file.is_file(), f"{name}: link to a missing file {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{name}: no heading for #{anchor} in {file.name}"


# --------------------------------------------------------------------------- docs/testing.md: promises -> tests

TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test")}


def test_every_promise_names_a_test_that_exists_or_says_it_has_none():
    """A renamed or deleted test must not leave a promise pointing at nothing."""
    text = (DOCS / "testing.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Promise")]
    assert len(rows) >= 40, "docs/testing.md lost its tables"
    for row in rows:
        assert TEST_REF.search(row) or "no test:" in row, f"docs/testing.md: a promise with no test named: {row[:90]}"
    cache: dict[str, set[str]] = {}
    for path, name in TEST_REF.findall(text):
        if path not in cache:
            assert (REPO / path).is_file(), f"docs/testing.md names {path}, which does not exist"
            cache[path] = defined_tests(REPO / path)
        assert name in cache[path], f"docs/testing.md names {path}::{name}, which is not a test there"
    assert "testing.md" in (DOCS / "design.md").read_text() and "docs/testing.md" in (REPO / "README.md").read_text()
    test_relative_links_resolve("testing.md")
