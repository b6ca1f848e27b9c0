"""The house rules of the package's imports (docs/architecture.md), checked on every import in
``deepscaler/``, those inside functions included: no cycles, and contracts that point one way.

Each failure names the file and line of the import that breaks the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "deepscaler"

# (importer prefix, imported prefix, why): the importer must never import the imported.
FORBIDDEN = [
    ("deepscaler.orchestrator", "deepscaler.trainer", "rollouts are made without the trainer's code"),
    ("deepscaler.inference", "deepscaler.trainer", "the servers read the weights format, not the trainer"),
    ("deepscaler.trainer", "deepscaler.inference", "the trainer talks to the servers only through the run directory"),
]
# Modules that may import only these modules of the package (an empty set: none).
ONLY = {
    "deepscaler.store": {"deepscaler.config", "deepscaler.errors", "deepscaler.process"},
    "deepscaler.handover": {"deepscaler.store"},
    "deepscaler.trainer.loss": set(),
    "deepscaler.errors": set(),
    "deepscaler.process": set(),
    "deepscaler.strict_yaml": set(),
    "deepscaler.faults": set(),
    "deepscaler.deadline_pool": set(),
    "deepscaler.slurm.options": set(),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(root: Path) -> list[tuple[str, str, str, int]]:
    """(importer, imported module, file, line) for every import of a module of ``root``'s
    package; ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    edges = set()
    for name, path in sorted(modules.items()):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.split(".")[0] == top and target != name:
                    edges.add((name, target, str(path.relative_to(root.parent)), node.lineno))
    return sorted(edges)


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(edges) -> list[str]:
    out = []
    for a, b, file, line in edges:
        for importer, imported, why in FORBIDDEN:
            if _under(a, importer) and _under(b, imported):
                out.append(f"{file}:{line} imports {b}: {why}")
        allowed = ONLY.get(a)
        if allowed is not None and b not in allowed:
            out.append(f"{file}:{line} imports {b}: {a} may import only {sorted(allowed) or 'nothing of the package'}")
    for component in cycles(edges):
        inside = [f"{file}:{line} -> {b}" for a, b, file, line in edges if a in component and b in component]
        out.append(f"import cycle {' <-> '.join(component)}: " + "; ".join(inside))
    return out


def test_the_package_has_no_import_cycle_and_keeps_its_rules():
    edges = import_edges(PACKAGE)
    assert len(edges) > 100  # the parser sees the package's imports, those in functions too
    problems = violations(edges)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_cycle_and_a_forbidden_arrow(tmp_path):
    """The rules above can fail: a planted package breaks each, inside a function too."""
    pkg = tmp_path / "deepscaler"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "trainer" / "__init__.py").write_text("")
    (pkg / "trainer" / "loss.py").write_text("from deepscaler.store import RunStore\n")
    (pkg / "store.py").write_text("def f():\n    from deepscaler import orchestrator\n")
    (pkg / "orchestrator.py").write_text("from deepscaler.trainer import loss\nimport deepscaler.store\n")
    problems = violations(import_edges(pkg))
    assert any(p.startswith("deepscaler/orchestrator.py:1 imports deepscaler.trainer.loss") for p in problems)
    assert any(p.startswith("deepscaler/store.py:2 imports deepscaler.orchestrator") for p in problems)
    assert any(p.startswith("deepscaler/trainer/loss.py:1 imports deepscaler.store") for p in problems)
    assert any(p.startswith("import cycle deepscaler.orchestrator <-> deepscaler.store") for p in problems)


def test_test_files_have_unique_basenames() -> None:
    """pytest imports test modules by basename (rootdir mode, no packages): two test files of
    one name stop the whole suite at collection."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    for path in sorted(tests.rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a basename"
        seen[path.name] = path
