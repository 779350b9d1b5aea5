"""What `cog build` reads from predict.py, found without importing it: the rules of cog 0.23.1's
build-time schema parser (Go + tree-sitter, pkg/schema/python/ in its source: inputs.go
parseInputCall, literals.go, module_scope.go, annotations.go), restated over Python's `ast`.

That parser never runs predict.py. For each run() parameter it reads `Input(...)` keywords:
  * default=: a literal, or a name bound at module level to one literal; anything else becomes
    "no default", so the input turns required;
  * description= (and regex=): a string literal or such a name; anything else is dropped;
  * ge=, le=, min_length=, max_length=: a number literal only (names, expressions: dropped);
  * strings are the raw text between the quotes, with no escape processing ("a\\n" stays
    backslash + n; r"..." is kept as is; f-strings, u/b/R prefixes, implicit concatenation and
    parentheses are dropped or garbled);
  * @cog.concurrent(max=...) takes an integer literal, or the build fails.
`read_predictor()` returns those values as the build would see them, and `problems()` lists
every place where they differ from what Python means (so the built image would serve another
schema than the one the tests check), or where predict.py leaves the subset this checks.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUT_KEYS = ("default", "description", "ge", "le", "min_length", "max_length", "regex",
              "choices", "deprecated", "accept")
STRING_KEYS = ("description", "regex", "accept")
NUMBER_KEYS = ("ge", "le", "min_length", "max_length")
SIMPLE_TYPES = {"str", "int", "float", "bool", "Optional[str]", "Optional[int]",
                "Optional[float]", "Optional[bool]"}

_GO_INT = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0|[1-9][0-9]*)")
_GO_FLOAT = re.compile(r"[+-]?(inf|infinity|nan|([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?)",
                       re.IGNORECASE)


class Unresolved:
    """A value the build-time parser cannot read (it drops it or falls back)."""

    def __repr__(self) -> str:
        return "<unresolved>"


UNRESOLVED = Unresolved()


@dataclass
class StaticInput:
    name: str
    order: int
    annotation: str
    keywords: dict[str, Any] = field(default_factory=dict)  # as cog build reads them
    python: dict[str, Any] = field(default_factory=dict)  # what Python evaluates them to
    notes: list[str] = field(default_factory=list)  # forms outside the checked subset


@dataclass
class StaticPredictor:
    inputs: list[StaticInput]
    concurrency_max: int | None | Unresolved
    streaming: bool
    is_async: bool
    notes: list[str] = field(default_factory=list)


def go_string(text: str) -> str | Unresolved:
    """cog's parseStringLiteral on a node's raw text."""
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else UNRESOLVED
    if text.startswith(('"', "'")):
        return text[1:-1] if len(text) >= 2 else UNRESOLVED
    if text.startswith(('r"', "r'")):
        return text[2:-1] if len(text) >= 3 else UNRESOLVED
    return UNRESOLVED


def go_number(text: str) -> float | Unresolved:
    """cog's parseNumberLiteral: Go's strconv.ParseFloat of the trimmed raw text (digit
    separators and hex are refused here, to stay on the safe side of Go's rules)."""
    text = text.strip()
    if not _GO_FLOAT.fullmatch(text):
        return UNRESOLVED
    return float(text)


def go_literal(node: ast.expr, text: str) -> Any:
    """cog's parseDefaultValue on a node whose raw text (parentheses included) is `text`."""
    text = text.strip()
    if text.startswith("("):
        return UNRESOLVED  # a parenthesized_expression: no literal to tree-sitter
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, bool):
            return node.value
        if isinstance(node.value, int):
            if not _GO_INT.fullmatch(text):
                return UNRESOLVED
            value = int(text, 0)
            return value if -(2**63) <= value < 2**63 else UNRESOLVED  # int64 only
        if isinstance(node.value, float):
            return go_number(text)
        if isinstance(node.value, str):
            return go_string(text)
        return UNRESOLVED
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if _GO_INT.fullmatch(text):
            return int(text, 0)
        return go_number(text)
    return UNRESOLVED  # names, calls, f-strings, containers: not in the subset checked here


_SOURCE = ""  # the file being read (set by read_predictor)


def _segment_text(node: ast.AST) -> str:
    return ast.get_source_segment(_SOURCE, node) or ""


def _value_text(holder: ast.AST, value: ast.expr) -> str:
    """The raw text of `value` as tree-sitter sees it: with any parentheses around it
    (Python's ast leaves them out of the node; to tree-sitter they make another node)."""
    whole = _segment_text(holder)
    inner = _segment_text(value)
    before, _, after = whole.rpartition(inner) if inner else ("", "", "")
    head = before.rsplit("=", 1)[-1] if "=" in before else before
    opened = head.count("(") - head.count(")")
    return "(" * max(opened, 0) + inner + ")" * max(opened, 0)


def _module_scope(tree: ast.Module) -> dict[str, Any]:
    """Module-level `NAME = literal` (last one wins), as cog's collectModuleScope."""
    scope: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        else:
            continue
        if isinstance(target, ast.Name):
            value = go_literal(stmt.value, _value_text(stmt, stmt.value))
            if value is not UNRESOLVED:
                scope[target.id] = value
            else:
                scope.pop(target.id, None)
    return scope


def _python_value(node: ast.expr, python_scope: dict[str, Any]) -> Any:
    """What Python evaluates a literal (or a module constant holding one) to."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name) and node.id in python_scope:
        return python_scope[node.id]
    return UNRESOLVED


def _python_scope(tree: ast.Module) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    for stmt in tree.body:
        target = (stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                  else stmt.target if isinstance(stmt, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and getattr(stmt, "value", None) is not None:
            try:
                scope[target.id] = ast.literal_eval(stmt.value)
            except ValueError:
                scope.pop(target.id, None)
    return scope


def _decorator_name(deco: ast.expr) -> str:
    target = deco.func if isinstance(deco, ast.Call) else deco
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
        return f"{target.value.id}.{target.attr}"
    return target.id if isinstance(target, ast.Name) else ""


def read_predictor(path: str | Path, cls: str = "Predictor") -> StaticPredictor:
    """The run()/predict() signature of `cls` in `path`, as cog build reads it."""
    global _SOURCE
    _SOURCE = Path(path).read_text()
    tree = ast.parse(_SOURCE)
    scope, python_scope = _module_scope(tree), _python_scope(tree)
    imported_from_cog = {alias.asname or alias.name for stmt in tree.body
                         if isinstance(stmt, ast.ImportFrom) and stmt.module == "cog"
                         for alias in stmt.names}
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in klass.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              and n.name in ("run", "predict"))
    notes: list[str] = []
    concurrency: int | None | Unresolved = None
    streaming = False
    for deco in fn.decorator_list:
        name = _decorator_name(deco)
        if name in ("cog.streaming", "streaming"):
            streaming = True
        if name in ("cog.concurrent", "concurrent"):
            concurrency = 1
            if isinstance(deco, ast.Call) and (deco.args or deco.keywords):
                kw = deco.keywords[0] if len(deco.keywords) == 1 and not deco.args else None
                value = (go_literal(kw.value, _value_text(kw, kw.value))
                         if kw is not None and kw.arg == "max" else UNRESOLVED)
                concurrency = (value if isinstance(value, int) and not isinstance(value, bool)
                               and value >= 1 else UNRESOLVED)
    params = fn.args.args[1:]  # after self
    defaults = [None] * (len(params) - len(fn.args.defaults)) + list(fn.args.defaults)
    if fn.args.kwonlyargs or fn.args.vararg or fn.args.kwarg or fn.args.posonlyargs:
        notes.append("run(): only plain parameters are checked")
    inputs = []
    for order, (arg, default) in enumerate(zip(params, defaults)):
        item = StaticInput(arg.arg, order, _segment_text(arg.annotation) if arg.annotation else "")
        if item.annotation not in SIMPLE_TYPES:
            item.notes.append(f"annotation {item.annotation!r} is not one this check covers")
        if isinstance(default, ast.Call) and _decorator_name(default) == "Input":
            if "Input" not in imported_from_cog:
                item.notes.append("Input must be imported with `from cog import Input`")
            if default.args:
                item.notes.append("positional Input() arguments are ignored by cog build")
            for kw in default.keywords:
                if kw.arg not in INPUT_KEYS:
                    item.notes.append(f"Input({kw.arg}=...) is not read by cog build")
                    continue
                item.python[kw.arg] = _python_value(kw.value, python_scope)
                item.keywords[kw.arg] = _read_keyword(kw, scope)
        elif default is not None:  # a plain default: must resolve, or the build fails
            item.python["default"] = _python_value(default, python_scope)
            item.keywords["default"] = _resolve(default, _value_text(fn.args, default), scope)
        inputs.append(item)
    return StaticPredictor(inputs, concurrency, streaming, isinstance(fn, ast.AsyncFunctionDef),
                           notes)


def _resolve(node: ast.expr, text: str, scope: dict[str, Any]) -> Any:
    value = go_literal(node, text)
    if value is UNRESOLVED and isinstance(node, ast.Name):
        return scope.get(node.id, UNRESOLVED)
    return value


def _read_keyword(kw: ast.keyword, scope: dict[str, Any]) -> Any:
    text = _value_text(kw, kw.value)
    if kw.arg in STRING_KEYS:
        value = go_string(text.strip()) if not text.strip().startswith("(") else UNRESOLVED
        if value is UNRESOLVED and isinstance(kw.value, ast.Name):
            found = scope.get(kw.value.id, UNRESOLVED)
            value = found if isinstance(found, str) else UNRESOLVED
        return value
    if kw.arg in NUMBER_KEYS:
        return go_number(text) if not text.strip().startswith("(") else UNRESOLVED
    return _resolve(kw.value, text, scope)


def _same(build: Any, python: Any) -> bool:
    if build is UNRESOLVED or python is UNRESOLVED:
        return False
    if isinstance(python, bool) or isinstance(build, bool):
        return build is python
    if isinstance(python, (int, float)) and isinstance(build, (int, float)):
        # bounds travel as float64: an integer bound must survive that exactly
        return float(build) == float(python) and (not isinstance(python, int)
                                                  or int(build) == python)
    return type(build) is type(python) and build == python


def problems(path: str | Path, cls: str = "Predictor") -> list[str]:
    """Every value cog build would read differently from Python, and every unchecked form."""
    info = read_predictor(path, cls)
    found = list(info.notes)
    if info.concurrency_max is UNRESOLVED:
        found.append("@cog.concurrent(max=...) must be an integer literal")
    for item in info.inputs:
        found += [f"{item.name}: {note}" for note in item.notes]
        for key, python in item.python.items():
            build = item.keywords.get(key, UNRESOLVED)
            if python is UNRESOLVED:
                found.append(f"{item.name}: {key}= must be a literal or a constant of this "
                             "module bound to one (cog build reads nothing else)")
            elif not _same(build, python):
                found.append(f"{item.name}: {key}= is {python!r} in Python, but cog build reads "
                             f"{'nothing (dropped)' if build is UNRESOLVED else repr(build)}")
    return found
