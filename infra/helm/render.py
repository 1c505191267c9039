"""Render the streamvqa Helm chart without helm: the subset of Go templates the chart uses.

No helm binary installs on the project machines, so CI renders the chart with this file and
lints / scans / checks the result (``tests/test_infra.py``). The chart stays a normal Helm chart
(``helm install`` renders it the same way); its templates keep to this subset:

- actions ``{{ pipeline }}`` with whitespace trimming ``{{-`` / ``-}}`` and ``{{/* comments */}}``;
- ``if`` / ``else if`` / ``else``, ``range`` (lists and maps, with ``$i, $v :=`` or ``$v :=``),
  ``with``, ``define`` (in ``templates/_*.tpl``) and ``include``; ``$x := pipeline``;
- operands: ``.``, ``$``, ``.Values.a.b``, ``$v.a``, ``"strings"``, numbers, ``true``/``false``;
- functions: ``quote``, ``toYaml``, ``nindent``, ``indent``, ``default``, ``required``, ``printf``
  (``%s``/``%d``/``%v``), ``int``, ``toString``, ``eq``, ``ne``, ``not``, ``and``, ``or``,
  ``empty``, ``include``, ``trunc``, ``trimSuffix``, ``lower``, ``add``, ``index``.

As in Helm: a missing map key gives nothing (printed as an empty string), reading a field of
nothing is an error ("nil pointer"), maps print with ``toYaml`` in sorted key order.

Command line::

    python infra/helm/render.py infra/helm/streamvqa [-f extra-values.yaml] [--set a.b=c]
        [--release streamvqa] [--namespace streamvqa] > manifests.yaml
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<assign>:=)
      | (?P<pipe>\|)
      | (?P<lpar>\()
      | (?P<rpar>\))
      | (?P<comma>,)
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<field>(?:\$[A-Za-z0-9_]*|\.)(?:[A-Za-z0-9_]*)(?:\.[A-Za-z0-9_]+)*)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)


class RenderError(ValueError):
    """A template that this renderer (and so probably Helm) cannot render."""


# ---------------------------------------------------------------- parsing


@dataclass
class _Node:
    kind: str  # text | action | if | range | with | define | assign
    text: str = ""
    expr: list = field(default_factory=list)
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)
    names: list = field(default_factory=list)  # range / assign variables


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise RenderError(f"cannot parse {expr[pos:]!r} in {{{{ {expr} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


def _lex(source: str) -> list[tuple[str, str]]:
    """Text and action pieces, with Go's trim markers applied to the neighbouring text."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(source):
        text = source[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        inner = m.group(2).strip()
        if not (inner.startswith("/*") and inner.endswith("*/")):
            pieces.append(("action", inner))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = source[pos:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))
    return pieces


def _parse(pieces: list[tuple[str, str]], pos: int = 0, stop: tuple = ()) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while pos < len(pieces):
        kind, value = pieces[pos]
        pos += 1
        if kind == "text":
            if value:
                nodes.append(_Node("text", text=value))
            continue
        word = value.split(None, 1)[0] if value else ""
        rest = value[len(word) :].strip()
        if word in stop:
            return nodes, pos, value
        if word in ("end", "else"):
            raise RenderError(f"unexpected {{{{ {value} }}}}")
        if word in ("if", "with", "range", "define"):
            node = _Node(word)
            if word == "define":
                node.text = rest.strip('"')
            elif word == "range":
                toks = _tokens(rest)
                if any(k == "assign" for k, _ in toks):
                    idx = [k for k, _ in toks].index("assign")
                    node.names = [v for k, v in toks[:idx] if k == "field"]
                    toks = toks[idx + 1 :]
                node.expr = toks
            else:
                node.expr = _tokens(rest)
            node.body, pos, ended = _parse(pieces, pos, ("end", "else"))
            current = node
            while ended.startswith("else"):
                tail = ended[4:].strip()
                if tail.startswith("if "):
                    nested = _Node("if", expr=_tokens(tail[3:]))
                    nested.body, pos, ended = _parse(pieces, pos, ("end", "else"))
                    current.orelse = [nested]
                    current = nested
                else:
                    current.orelse, pos, ended = _parse(pieces, pos, ("end",))
            nodes.append(node)
            continue
        toks = _tokens(value)
        if len(toks) > 2 and toks[0][0] == "field" and toks[0][1].startswith("$") and toks[1][0] == "assign":
            nodes.append(_Node("assign", names=[toks[0][1]], expr=toks[2:]))
        else:
            nodes.append(_Node("action", expr=toks))
    if stop:
        raise RenderError(f"missing {{{{ end }}}} (wanted one of {stop})")
    return nodes, pos, ""


# ---------------------------------------------------------------- evaluation


def _truthy(value: Any) -> bool:
    return not (
        value is None
        or value is False
        or (value == 0 and not isinstance(value, bool))
        or value in ("", [], {})
    )


def _to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    return (
        yaml.safe_dump(value, default_flow_style=False, sort_keys=True, width=1 << 16)
        .rstrip("\n")
        .removesuffix("\n...")
    )


def _to_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return _to_yaml(value)
    return str(value)


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def sub(m: re.Match) -> str:
        return "%" if m.group(0) == "%%" else _to_string(next(it))

    return re.sub(r"%%|%[svd]", sub, fmt)


def _required(message: str, value: Any) -> Any:
    if not _truthy(value) and value is not False and value != 0:
        raise RenderError(message)
    return value


def _index(value: Any, keys: tuple) -> Any:
    for key in keys:
        if value is None:
            raise RenderError(f"index of nil with {key!r}")
        value = value.get(key) if isinstance(value, dict) else value[int(key)]
    return value


def _indent(n: int, text: str) -> str:
    return "\n".join((" " * int(n) + line) if line else line for line in _to_string(text).split("\n"))


class _Renderer:
    def __init__(self, defines: dict[str, list[_Node]]):
        self.defines = defines
        self.functions = {
            "quote": lambda *v: " ".join(
                '"' + _to_string(x).replace("\\", "\\\\").replace('"', '\\"') + '"' for x in v
            ),
            "toYaml": _to_yaml,
            "nindent": lambda n, s: "\n" + _indent(n, s),
            "indent": _indent,
            "default": lambda d, v=None: v if _truthy(v) else d,
            "required": _required,
            "printf": _printf,
            "int": lambda v: int(v or 0),
            "toString": _to_string,
            "eq": lambda a, *b: any(a == x for x in b),
            "ne": lambda a, b: a != b,
            "not": lambda v: not _truthy(v),
            "and": lambda *v: next((x for x in v if not _truthy(x)), v[-1]),
            "or": lambda *v: next((x for x in v if _truthy(x)), v[-1]),
            "empty": lambda v: not _truthy(v),
            "include": self._include,
            "trunc": lambda n, s: _to_string(s)[: int(n)],
            "trimSuffix": lambda suffix, s: _to_string(s).removesuffix(suffix),
            "lower": lambda s: _to_string(s).lower(),
            "add": lambda *v: sum(int(x) for x in v),
            "index": lambda m, *keys: _index(m, keys),
        }

    def _include(self, name: str, dot: Any) -> str:
        if name not in self.defines:
            raise RenderError(f"include of undefined template {name!r}")
        return self.render(self.defines[name], dot, {"$": dot})

    # -- expressions
    def _field(self, path: str, dot: Any, scope: dict) -> Any:
        if path.startswith("$"):
            head, _, rest = path.partition(".")
            if head not in scope:
                raise RenderError(f"undefined variable {head}")
            value, parts = scope[head], [p for p in rest.split(".") if p]
        else:
            value, parts = dot, [p for p in path.split(".") if p]
        walked = path.split(".")[0] or ""
        for part in parts:
            if value is None:
                raise RenderError(f"nil pointer evaluating {walked}.{part}")
            if not isinstance(value, dict):
                raise RenderError(f"can't evaluate field {part} in {walked} ({type(value).__name__})")
            value = value.get(part)
            walked = f"{walked}.{part}"
        return value

    def _operand(self, toks: list, i: int, dot: Any, scope: dict) -> tuple[Any, int]:
        kind, value = toks[i]
        if kind == "str":
            return bytes(value[1:-1], "utf-8").decode("unicode_escape"), i + 1
        if kind == "num":
            return (float(value) if "." in value else int(value)), i + 1
        if kind == "field":
            return self._field(value, dot, scope), i + 1
        if kind == "ident" and value in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[value], i + 1
        if kind == "lpar":
            depth, j = 1, i + 1
            while depth:
                if j >= len(toks):
                    raise RenderError("unbalanced parentheses")
                depth += {"lpar": 1, "rpar": -1}.get(toks[j][0], 0)
                j += 1
            return self.pipeline(toks[i + 1 : j - 1], dot, scope), j
        if kind == "ident":
            return self.call(value, [], dot, scope), i + 1
        raise RenderError(f"unexpected token {value!r}")

    def call(self, name: str, args: list, dot: Any, scope: dict) -> Any:
        if name not in self.functions:
            raise RenderError(f"function {name!r} is not in the supported subset")
        return self.functions[name](*args)

    def _command(self, toks: list, dot: Any, scope: dict, piped: tuple) -> Any:
        if toks and toks[0][0] == "ident" and toks[0][1] not in ("true", "false", "nil"):
            args, i = [], 1
            while i < len(toks):
                value, i = self._operand(toks, i, dot, scope)
                args.append(value)
            return self.call(toks[0][1], args + list(piped), dot, scope)
        value, i = self._operand(toks, 0, dot, scope)
        if i != len(toks) or piped:
            raise RenderError(f"can't give arguments to a non-function: {toks}")
        return value

    def pipeline(self, toks: list, dot: Any, scope: dict) -> Any:
        commands, depth, current = [], 0, []
        for tok in toks:
            depth += {"lpar": 1, "rpar": -1}.get(tok[0], 0)
            if tok[0] == "pipe" and depth == 0:
                commands.append(current)
                current = []
            else:
                current.append(tok)
        commands.append(current)
        value: tuple = ()
        for cmd in commands:
            value = (self._command(cmd, dot, scope, value),)
        return value[0]

    # -- statements
    def render(self, nodes: list[_Node], dot: Any, scope: dict) -> str:
        out: list[str] = []
        scope = dict(scope)
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "action":
                out.append(_to_string(self.pipeline(node.expr, dot, scope)))
            elif node.kind == "assign":
                scope[node.names[0]] = self.pipeline(node.expr, dot, scope)
            elif node.kind == "if":
                branch = node.body if _truthy(self.pipeline(node.expr, dot, scope)) else node.orelse
                out.append(self.render(branch, dot, scope))
            elif node.kind == "with":
                value = self.pipeline(node.expr, dot, scope)
                out.append(
                    self.render(node.body, value, scope)
                    if _truthy(value)
                    else self.render(node.orelse, dot, scope)
                )
            elif node.kind == "range":
                value = self.pipeline(node.expr, dot, scope)
                items = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
                if not items:
                    out.append(self.render(node.orelse, dot, scope))
                for key, item in items:
                    inner = dict(scope)
                    if len(node.names) == 2:
                        inner[node.names[0]], inner[node.names[1]] = key, item
                    elif len(node.names) == 1:
                        inner[node.names[0]] = item
                    out.append(self.render(node.body, item, inner))
            # define nodes are collected before rendering and print nothing
        return "".join(out)


def _split_defines(nodes: list[_Node], defines: dict[str, list[_Node]]) -> list[_Node]:
    kept = []
    for node in nodes:
        if node.kind == "define":
            defines[node.text] = node.body
        else:
            kept.append(node)
    return kept


# ---------------------------------------------------------------- chart


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_value(values: dict, dotted: str, raw: str) -> None:
    """``--set a.b=c``: the value parsed as YAML (numbers, booleans), as Helm does for scalars."""
    parts = dotted.split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_values(chart: Path, files: tuple[Path, ...] = (), sets: dict[str, str] | None = None) -> dict:
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    for path in files:
        values = deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    for key, raw in (sets or {}).items():
        set_value(values, key, raw)
    return values


def render_chart(
    chart: str | Path,
    values: dict | None = None,
    release: str = "streamvqa",
    namespace: str = "streamvqa",
) -> dict[str, str]:
    """Template file name -> rendered text (files that render to nothing are left out)."""
    chart = Path(chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    if values is None:
        values = load_values(chart)
    dot = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion")},
    }
    defines: dict[str, list[_Node]] = {}
    parsed: dict[str, list[_Node]] = {}
    for path in sorted((chart / "templates").iterdir()):
        if path.suffix not in (".yaml", ".yml", ".tpl"):
            continue
        nodes, _, _ = _parse(_lex(path.read_text()))
        nodes = _split_defines(nodes, defines)
        if not path.name.startswith("_"):
            parsed[path.name] = nodes
    renderer = _Renderer(defines)
    out = {}
    for name, nodes in parsed.items():
        try:
            text = renderer.render(nodes, dot, {"$": dot})
        except RenderError as err:
            raise RenderError(f"{name}: {err}") from err
        if text.strip():
            out[name] = text
    return out


def render_manifests(chart: str | Path, values: dict | None = None, **kw: Any) -> str:
    """One multi-document YAML stream, as ``helm template`` prints it."""
    chart = Path(chart)
    docs = []
    for name, text in render_chart(chart, values, **kw).items():
        for doc in re.split(r"(?m)^---\s*$", text):
            if doc.strip():
                docs.append(f"---\n# Source: {chart.name}/templates/{name}\n{doc.strip()}\n")
    return "".join(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("chart", type=Path)
    parser.add_argument("-f", "--values", type=Path, action="append", default=[])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--release", default="streamvqa")
    parser.add_argument("--namespace", default="streamvqa")
    args = parser.parse_args(argv)
    sets = dict(item.split("=", 1) for item in args.set)
    values = load_values(args.chart, tuple(args.values), sets)
    sys.stdout.write(render_manifests(args.chart, values, release=args.release, namespace=args.namespace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
