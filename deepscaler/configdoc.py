"""``python -m deepscaler.configdoc``: the Markdown reference of every config key.

    python -m deepscaler.configdoc                      # print it
    python -m deepscaler.configdoc --write              # rewrite docs/config-reference.md
    python -m deepscaler.configdoc --check              # exit 1 if the committed file is stale
    python -m deepscaler.configdoc --missing            # keys whose field has no comment yet

Everything comes from the sources, so the reference cannot say what the code does not:

- keys, types and defaults from the dataclass tree of ``deepscaler/config.py`` (defaults
  read from an instance, so ``eval.resources`` shows its own defaults, not
  ``ComponentResources``');
- each key's description from the ``#`` comments of its field in ``config.py``: the comment
  lines directly above the field and the comment at the end of its line(s), read with
  ``tokenize``; a section's description is its class docstring;
- where a shipped ``yaml/*.yaml`` file sets the key, with the value and that line's ``#``
  comment (the ``# paper:`` provenance of base.yaml and the stage files).

``tests/unit/test_docs.py`` regenerates the file and compares it with the committed one.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deepscaler.config import Config, yaml_dir

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"
REGENERATE = "python -m deepscaler.configdoc --write"
PLACEHOLDER = "<name>"  # the free key of a mapping field (eval.benchmarks.<name>.samples)


@dataclasses.dataclass
class Key:
    path: str
    type: str
    default: str
    doc: str
    set_in: list[str]


# --------------------------------------------------------------------------- comments of config.py


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment text} for one dataclass, from its source: the comment lines
    directly above the field (no blank line between) and the comments on the field's own
    line(s), joined with a space."""
    source = inspect.getsource(cls)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []  # comment-only lines right before the current logical line
    line: list[tokenize.TokenInfo] = []  # tokens of the current logical line
    depth = 0
    for tok in tokens:
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type == tokenize.COMMENT:
            if line:
                line.append(tok)
            else:
                above.append(_comment_text(tok.string))
            continue
        if tok.type == tokenize.NL:
            if not line and (not above or tok.line.strip() == ""):
                above = []  # a blank line separates a comment from what follows
            continue
        if tok.type == tokenize.NEWLINE or tok.type == tokenize.ENDMARKER:
            code = [t for t in line if t.type != tokenize.COMMENT]
            is_field = (depth == 1 and len(code) >= 2 and code[0].type == tokenize.NAME
                        and code[0].string in names and code[1].string == ":")
            if is_field:
                trailing = [_comment_text(t.string) for t in line if t.type == tokenize.COMMENT]
                text = " ".join(x for x in [*above, *trailing] if x)
                if text:
                    out[code[0].string] = text
            line, above = [], []
            continue
        line.append(tok)
    return out


def _comment_text(comment: str) -> str:
    return comment.lstrip("#").strip()


# --------------------------------------------------------------------------- types and values


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def fmt_value(value: Any) -> str:
    """A value as written in YAML (flow style), e.g. ``null``, ``[0.9, 0.999]``, ``{samples: 1}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # quoted where YAML would read it as something else ("0002", "true")
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain and value else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return fmt_value(dataclasses.asdict(value))
    return str(value)


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- the shipped YAML files


def yaml_files() -> list[Path]:
    """The shipped files in reading order: base, the stages, then the others."""
    files = sorted(yaml_dir().glob("*.yaml"))

    def order(p: Path) -> tuple[int, str]:
        if p.stem == "base":
            return (0, "")
        if re.fullmatch(r"stage\d+", p.stem):
            return (1, f"{int(p.stem[5:]):04d}")
        return (2, p.stem)

    return sorted(files, key=order)


def yaml_line_comments(text: str) -> dict[str, str]:
    """{dotted key: the ``#`` comment at the end of its line} for a block-style YAML file."""
    stack: list[tuple[int, str]] = []
    out: dict[str, str] = {}
    for raw in text.splitlines():
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):(.*)$", raw)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = _trailing_comment(rest)
        if comment:
            out[".".join(k for _, k in stack)] = comment
    return out


def _trailing_comment(rest: str) -> str | None:
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1:].strip()
    return None


def yaml_settings(path: Path) -> dict[str, list[str]]:
    """{reference key: ["value (comment)", ...]} of what one file sets (without what it extends).
    Keys under a mapping field are filed under ``<name>``, each value prefixed with its entry."""
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("extends", None)
    comments = yaml_line_comments(text)
    out: dict[str, list[str]] = {}

    def comment_for(parts: list[str]) -> str | None:
        for n in range(len(parts), 0, -1):  # a flow mapping's comment covers its leaves
            c = comments.get(".".join(parts[:n]))
            if c:
                return c
        return None

    def walk(value: Any, tp: Any, parts: list[str], ref: list[str], entry: str | None) -> None:
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            hints = typing.get_type_hints(tp)
            for name, sub in value.items():
                if name in hints:
                    walk(sub, hints[name], [*parts, str(name)], [*ref, str(name)], entry)
            return
        if typing.get_origin(tp) is dict and isinstance(value, dict):
            item = typing.get_args(tp)[1]
            for name, sub in value.items():
                walk(sub, item, [*parts, str(name)], [*ref, PLACEHOLDER], str(name))
            return
        shown = fmt_value(value)
        if entry is not None:
            shown = f"{entry}: {shown}"
        comment = comment_for(parts)
        out.setdefault(".".join(ref), []).append(_code(shown) + (f" ({_cell(comment)})" if comment else ""))

    walk(data, Config, [], [], None)
    return out


# --------------------------------------------------------------------------- the tree


def sections() -> list[tuple[str, str, list[Key]]]:
    """(dotted section, description, keys) for every dataclass node of the tree, depth first."""
    settings = {p.name: yaml_settings(p) for p in yaml_files()}
    out: list[tuple[str, str, list[Key]]] = []

    def set_in(path: str) -> list[str]:
        return [f"{name}: {'; '.join(keys[path])}" for name, keys in settings.items() if keys.get(path)]

    def visit(cls: type, instance: Any, prefix: str, doc: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        keys: list[Key] = []
        children: list[tuple[type, Any, str, str]] = []
        for f in dataclasses.fields(cls):
            tp, value, path = hints[f.name], getattr(instance, f.name), f"{prefix}{f.name}"
            comment = comments.get(f.name, "")
            if dataclasses.is_dataclass(tp):
                children.append((tp, value, path, comment))
                continue
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                item = typing.get_args(tp)[1]
                keys.append(Key(path, f"mapping of name to {path}.{PLACEHOLDER}", _code(fmt_value(value)), comment,
                                set_in(path)))
                children.append((item, item(), f"{path}.{PLACEHOLDER}", comment))
                continue
            keys.append(Key(path, type_name(tp), _code(fmt_value(value)), comment, set_in(path)))
        out.append((prefix.rstrip("."), doc, keys))
        for tp, value, path, comment in children:
            class_doc = inspect.cleandoc(tp.__doc__) if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "(") else ""
            visit(tp, value, path + ".", " ".join(x for x in (comment, class_doc) if x))

    for f in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[f.name]
        class_doc = inspect.cleandoc(tp.__doc__) if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "(") else ""
        visit(tp, getattr(Config(), f.name), f"{f.name}.", class_doc)
    return out


def render() -> str:
    files = ", ".join(f"`{p.name}`" for p in yaml_files())
    lines = [
        "# Configuration reference",
        "",
        f"<!-- GENERATED by `{REGENERATE}` from deepscaler/config.py and yaml/*.yaml; do not edit by hand. -->",
        "",
        "Every key of the config tree (`deepscaler/config.py`): its type, its default (the dataclass",
        "value, used when no file sets it), the comment of its field in `config.py`, and the shipped",
        "files of `yaml/` that set it, with the value and the comment on that line:",
        f"{files}.",
        "A stage reads `stage<K>.yaml` (which `extends: base.yaml`), then `--preset` (e.g. `tiny.yaml`),",
        "then `key=value` overrides; `python -m deepscaler.config yaml/stage2.yaml` prints the result.",
        "How files, overrides and checks work: [config.md](config.md).",
        "",
    ]
    for name, doc, keys in sections():
        depth = name.count(".")
        lines.append(f"{'#' * (2 + min(depth, 1))} `{name}`")
        lines.append("")
        if doc:
            lines += [doc, ""]
        if not keys:
            continue
        lines.append("| key | type | default | meaning | set in `yaml/` |")
        lines.append("|---|---|---|---|---|")
        for k in keys:
            lines.append(f"| `{k.path}` | {k.type} | {k.default} | {_cell(k.doc)} | {'<br>'.join(k.set_in)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepscaler.configdoc", description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {REFERENCE.relative_to(REFERENCE.parents[1])}")
    group.add_argument("--check", action="store_true", help="exit 1 if the committed reference differs")
    group.add_argument("--missing", action="store_true", help="list the keys whose field has no comment in config.py")
    args = p.parse_args(argv)
    if args.missing:
        print("\n".join(k.path for _, _, keys in sections() for k in keys if not k.doc))
        return 0
    text = render()
    if args.write:
        REFERENCE.write_text(text, encoding="utf-8")
        print(f"wrote {REFERENCE}")
        return 0
    if args.check:
        current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
        if current != text:
            print(f"error: {REFERENCE} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
