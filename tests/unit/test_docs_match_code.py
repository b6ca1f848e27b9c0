"""Claims of the docs that the code decides, checked against the code so they cannot drift
(issue 26, item 5): docs/architecture.md's module map and docs/design.md's writers of
``metrics.jsonl``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.unit.test_architecture import ONLY, PACKAGE, import_edges, module_name

DOCS = PACKAGE.parent / "docs"
ROW = re.compile(r"^\| `([\w/]+)\.py` \| (.*) \| ([^|]*) \|$")


def short(module: str) -> str:
    """``deepscaler.slurm.jobs`` -> ``slurm.jobs``, as the map writes imports."""
    return module.removeprefix(f"{PACKAGE.name}.")


def module_map(text: str) -> dict[str, tuple[set[str], int]]:
    """{module: (the imports its row names, line number)} of the map's rows."""
    section = text[text.index("## Module map"):]
    offset = text[: text.index("## Module map")].count("\n") + 1
    rows = {}
    for i, line in enumerate(section.splitlines()):
        m = ROW.match(line)
        if m:
            module = m.group(1).replace("/", ".")
            assert module not in rows, f"docs/architecture.md:{offset + i}: a second row for {module}"
            named = set() if m.group(3).strip() == "-" else set(re.findall(r"`([\w.]+)`", m.group(3)))
            rows[module] = (named, offset + i)
    return rows


def code_imports() -> dict[str, set[str]]:
    """{module: every module of the package it imports} for each module that has a row: not the
    packages' ``__init__`` nor their ``__main__`` (one line calling the module's main)."""
    modules = {short(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    out = {m: set() for m in modules}
    for a, b, _, _ in import_edges(PACKAGE):
        if short(a) in out:
            out[short(a)].add(short(b))
    return out


def row_text(imports: set[str]) -> str:
    return ", ".join(f"`{m}`" for m in sorted(imports)) or "-"


def check_map(text: str, code: dict[str, set[str]]) -> list[str]:
    """One line per difference, naming the docs' line and what to write there."""
    rows = module_map(text)
    problems = [f"docs/architecture.md: module map has no row for {m} (imports: {row_text(code[m])})"
                for m in sorted(set(code) - set(rows))]
    problems += [f"docs/architecture.md:{rows[m][1]}: a row for {m}, which is no module of the package"
                 for m in sorted(set(rows) - set(code))]
    problems += [f"docs/architecture.md:{rows[m][1]}: {m} imports {row_text(code[m])} (the map says "
                 f"{row_text(rows[m][0])})" for m in sorted(set(rows) & set(code)) if rows[m][0] != code[m]]
    return problems


def test_the_module_map_names_every_module_and_exactly_its_imports() -> None:
    problems = check_map((DOCS / "architecture.md").read_text(encoding="utf-8"), code_imports())
    assert not problems, "\n".join(problems)


def test_the_map_check_finds_a_missing_import_a_missing_row_and_a_stale_one() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    code = {m: named for m, (named, _) in module_map(text).items()}  # code that matches the map
    assert check_map(text, code) == []  # accepted
    drifted = {**code, "launch": code["launch"] | {"submit"}, "brand_new": set()}
    del drifted["status"]
    problems = check_map(text, drifted)
    assert len(problems) == 3, problems
    assert problems[0].startswith("docs/architecture.md: module map has no row for brand_new")
    assert "a row for status, which is no module" in problems[1]
    assert "launch imports" in problems[2] and "`submit`" in problems[2]


def test_the_import_rules_in_the_docs_are_the_ones_the_architecture_test_enforces() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    rule = re.search(r"^- `store` imports at most (.*?)\n(?=\S|\n)", text, re.S | re.M).group(0)
    nothing = set(re.findall(r"`([\w/]+)`", rule.split(";")[-1]))
    assert nothing == {short(m).replace(".", "/") for m, allowed in ONLY.items() if not allowed}, rule
    for module, allowed in ONLY.items():
        if allowed:
            clause = next(c for c in rule.split(";") if re.search(rf"`{short(module)}` (imports|only)", c))
            assert set(re.findall(r"`([\w.]+)`", clause)) - {short(module)} == {short(m) for m in allowed}, clause


def metrics_sources() -> set[str]:
    """The ``source`` of every record the package appends to ``metrics.jsonl``: dict literals
    with a ``source`` key in the modules that call ``append_metrics``."""
    sources = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "append_metrics(" not in text or path.name == "store.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "source" and isinstance(v, ast.Constant):
                        sources.add(v.value)
    return sources


def test_design_names_every_writer_of_metrics_jsonl() -> None:
    text = (DOCS / "design.md").read_text(encoding="utf-8")
    bullet = text[text.index("- **`metrics.jsonl` has"):].split("\n- ")[0]
    sources = metrics_sources()
    assert {"orchestrator", "trainer", "launcher", "submit"} <= sources, sources
    named = set(re.findall(r"`source: (\w+)`", bullet))
    assert named == sources, f"docs/design.md names {sorted(named)}; the code writes {sorted(sources)}"
