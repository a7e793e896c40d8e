"""The deployment as terraform describes it, read with python-hcl2, for the rehearsal
(`make rehearse`) and for `make function-source`.

`Deployment.minimal()` evaluates the root module in `terraform/` with the inputs
that `terraform/examples/minimal` gives it (and that example's
`terraform.tfvars.example`), so every name, environment variable, endpoint and
policy below is the one a user's first `terraform apply` would create. Only what
the Google provider computes at apply time (URIs, ids, e-mails, IP addresses,
the project number) is asked of a `computed` hook, which the rehearsal answers
with its emulators.

The expression language is the subset of HCL these files use: references
(var, local, path, each, data, resources with for_each), templates and heredocs,
arithmetic, comparisons, conditionals, for expressions, and the functions listed
in `FUNCTIONS`. Anything else raises `Unsupported`, naming it.

`function_archive()` builds the function source exactly as `data.archive_file.source`
does (hashicorp/archive >= 2.5: the same walk, the same doublestar excludes).

    python -m scripts.deployment archive      # writes terraform/.build/function-source.zip
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TERRAFORM = ROOT / "terraform"
MINIMAL = TERRAFORM / "examples" / "minimal"

_MARKERS = {"__is_block__", "__comments__", "__inline_comments__"}


class Unsupported(Exception):
    """An expression or reference this reader does not evaluate."""


class Unresolved(Exception):
    """A value only the provider knows at apply time, and the `computed` hook did not give."""


# -- reading the files -----------------------------------------------------------------


def _unquote_key(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def _clean(value: Any) -> Any:
    """python-hcl2's output without its markers; block labels unquoted, values kept raw."""
    if isinstance(value, dict):
        return {_unquote_key(k): _clean(v) for k, v in value.items() if k not in _MARKERS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@cache
def _parse_file(path: Path) -> dict[str, Any]:
    import hcl2

    with path.open(encoding="utf-8") as handle:
        return _clean(hcl2.load(handle))  # type: ignore[no-any-return]


@dataclass
class Module:
    """The blocks of one folder of .tf files."""

    path: Path
    resources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    data: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Module:
        module = cls(path)
        for tf in sorted(path.glob("*.tf")):
            doc = _parse_file(tf)
            for entry in doc.get("resource", []):
                for rtype, named in entry.items():
                    module.resources.setdefault(rtype, {}).update(named)
            for entry in doc.get("data", []):
                for rtype, named in entry.items():
                    module.data.setdefault(rtype, {}).update(named)
            for entry in doc.get("variable", []):
                module.variables.update(entry)
            for entry in doc.get("locals", []):
                module.locals.update(entry)
            for entry in doc.get("module", []):
                module.modules.update(entry)
        return module


# -- expressions -----------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_NUMBER = re.compile(r"\d+(\.\d+)?([eE][+-]?\d+)?")


@dataclass
class Node:
    kind: str
    args: tuple[Any, ...]


class _Parser:
    """HCL expression text -> `Node` tree (recursive descent)."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, what: str) -> Unsupported:
        return Unsupported(f"{what} at {self.i} in {self.s!r}")

    def ws(self) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif self.s.startswith("#", self.i) or self.s.startswith("//", self.i):
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def peek(self, token: str) -> bool:
        self.ws()
        return self.s.startswith(token, self.i)

    def take(self, token: str) -> bool:
        if self.peek(token):
            self.i += len(token)
            return True
        return False

    def expect(self, token: str) -> None:
        if not self.take(token):
            raise self.error(f"expected {token!r}")

    def keyword(self, word: str) -> bool:
        self.ws()
        m = _IDENT.match(self.s, self.i)
        if m and m.group(0) == word:
            self.i = m.end()
            return True
        return False

    def parse(self) -> Node:
        node = self.expr()
        self.ws()
        if self.i != len(self.s):
            raise self.error("unexpected text")
        return node

    def expr(self) -> Node:
        cond = self.binary(0)
        if self.take("?"):
            yes = self.expr()
            self.expect(":")
            no = self.expr()
            return Node("cond", (cond, yes, no))
        return cond

    _LEVELS = (("||",), ("&&",), ("==", "!="), ("<=", ">=", "<", ">"), ("+", "-"),
               ("*", "/", "%"))

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while True:
            self.ws()
            op = next((o for o in self._LEVELS[level] if self.s.startswith(o, self.i)), None)
            if op is None:
                return left
            self.i += len(op)
            left = Node("op", (op, left, self.binary(level + 1)))

    def unary(self) -> Node:
        if self.take("!"):
            return Node("not", (self.unary(),))
        self.ws()
        if self.s.startswith("-", self.i) and not self.s.startswith("->", self.i):
            self.i += 1
            return Node("neg", (self.unary(),))
        return self.postfix(self.primary())

    def postfix(self, node: Node) -> Node:
        while True:
            self.ws()
            if self.s.startswith(".*", self.i):
                raise self.error("splat expressions")
            if self.s.startswith(".", self.i) and not self.s.startswith("...", self.i):
                self.i += 1
                self.ws()
                m = _IDENT.match(self.s, self.i) or re.compile(r"\d+").match(self.s, self.i)
                if not m:
                    raise self.error("expected an attribute name")
                self.i = m.end()
                key: Any = int(m.group(0)) if m.group(0).isdigit() else m.group(0)
                node = Node("get", (node, Node("lit", (key,))))
            elif self.s.startswith("[", self.i):
                self.i += 1
                index = self.expr()
                self.expect("]")
                node = Node("get", (node, index))
            else:
                return node

    def primary(self) -> Node:
        self.ws()
        c = self.s[self.i:self.i + 1]
        if c == '"':
            return self.template()
        if self.s.startswith("<<", self.i):
            return self.heredoc()
        if c == "(":
            self.i += 1
            inner = self.expr()
            self.expect(")")
            return inner
        if c == "[":
            return self.tuple_()
        if c == "{":
            return self.object_()
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            text = m.group(0)
            return Node("lit", (float(text) if "." in text or "e" in text.lower() else int(text),))
        m = _IDENT.match(self.s, self.i)
        if not m:
            raise self.error("expected an expression")
        self.i = m.end()
        name = m.group(0)
        if name in ("true", "false"):
            return Node("lit", (name == "true",))
        if name == "null":
            return Node("lit", (None,))
        if self.take("("):
            args = []
            expand = False
            while not self.take(")"):
                args.append(self.expr())
                if self.take("..."):
                    expand = True
                self.take(",")
            return Node("call", (name, tuple(args), expand))
        return Node("ref", (name,))

    def tuple_(self) -> Node:
        self.expect("[")
        if self.keyword("for"):
            names = self.for_names()
            source = self.expr()
            self.expect(":")
            value = self.expr()
            cond = self.expr() if self.keyword("if") else None
            self.expect("]")
            return Node("for_list", (names, source, value, cond))
        items = []
        while not self.take("]"):
            items.append(self.expr())
            self.take(",")
        return Node("list", tuple(items))

    def for_names(self) -> tuple[str, ...]:
        names = []
        while True:
            self.ws()
            m = _IDENT.match(self.s, self.i)
            if not m:
                raise self.error("expected a for variable")
            self.i = m.end()
            names.append(m.group(0))
            if not self.take(","):
                break
        if not self.keyword("in"):
            raise self.error("expected 'in'")
        return tuple(names)

    def object_(self) -> Node:
        self.expect("{")
        if self.keyword("for"):
            names = self.for_names()
            source = self.expr()
            self.expect(":")
            key = self.expr()
            self.expect("=>")
            value = self.expr()
            if self.take("..."):
                raise self.error("grouping for expressions")
            cond = self.expr() if self.keyword("if") else None
            self.expect("}")
            return Node("for_map", (names, source, key, value, cond))
        items = []
        while not self.take("}"):
            self.ws()
            m = _IDENT.match(self.s, self.i)
            key: Node
            if m and not self.s.startswith("(", self.i):
                self.i = m.end()
                key = Node("lit", (m.group(0),))
            else:
                key = self.expr()
            if not (self.take("=") or self.take(":")):
                raise self.error("expected '=' in an object")
            items.append((key, self.expr()))
            self.take(",")
        return Node("map", tuple(items))

    def template(self) -> Node:
        self.expect('"')
        parts: list[Any] = []
        text: list[str] = []
        escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
        while True:
            if self.i >= len(self.s):
                raise self.error("unterminated string")
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                break
            if c == "\\":
                nxt = self.s[self.i + 1]
                if nxt not in escapes:
                    raise self.error(f"escape \\{nxt}")
                text.append(escapes[nxt])
                self.i += 2
            elif self.s.startswith("$${", self.i):
                text.append("${")
                self.i += 3
            elif self.s.startswith("${", self.i):
                self.i += 2
                if text:
                    parts.append("".join(text))
                    text = []
                parts.append(self.expr())
                self.expect("}")
            else:
                text.append(c)
                self.i += 1
        if text or not parts:
            parts.append("".join(text))
        return Node("template", tuple(parts))

    def heredoc(self) -> Node:
        m = re.compile(r"<<(-?)([A-Za-z_]+)\n").match(self.s, self.i)
        if not m:
            raise self.error("malformed heredoc")
        indent, marker = m.group(1) == "-", m.group(2)
        end = re.compile(r"^[ \t]*" + marker + r"[ \t]*$", re.M).search(self.s, m.end())
        if not end:
            raise self.error("unterminated heredoc")
        body = self.s[m.end():end.start()]
        self.i = end.end()
        lines = body.split("\n")
        if indent:
            widths = [len(x) - len(x.lstrip(" \t")) for x in lines if x.strip()]
            cut = min(widths, default=0)
            lines = [x[cut:] for x in lines]
        inner = _Parser('"' + "\n".join(lines).replace("\\", "\\\\").replace('"', '\\"') + '"')
        return inner.template()


def parse_expression(text: str) -> Node:
    return _Parser(text).parse()


def _raw_node(value: Any) -> Any:
    """python-hcl2's representation of one value -> a Node or a plain value."""
    if isinstance(value, str):
        if value.startswith("${") and value.endswith("}"):
            inner = _Parser(value[2:-1])
            try:
                return inner.parse()
            except Unsupported:
                pass
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            inner_text = value[1:-1]
            if inner_text.startswith("<<"):
                return _Parser(inner_text).heredoc()
            return _Parser(value).template()
        return parse_expression(value)
    return value


# -- evaluation -------------------------------------------------------------------------


def _tostring(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if v is None:
        raise Unsupported("tostring(null)")
    return str(v)


def _coalesce(*values: Any) -> Any:
    for v in values:
        if v is not None and v != "":
            return v
    raise Unsupported("coalesce() of nothing")


def _merge(*maps: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in maps:
        out.update(m or {})
    return out


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "coalesce": _coalesce,
    "merge": _merge,
    "tostring": _tostring,
    "tonumber": lambda v: float(v) if "." in str(v) else int(v),
    "jsonencode": lambda v: json.dumps(v, separators=(",", ":"), sort_keys=True),
    "length": len,
    "replace": lambda s, a, b: s.replace(a, b),
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "contains": lambda coll, v: v in coll,
    "keys": lambda m: sorted(m),
    "values": lambda m: [m[k] for k in sorted(m)],
    "toset": lambda v: sorted(set(v)),
    "tolist": list,
    "tomap": dict,
    "join": lambda sep, items: sep.join(items),
    "split": lambda sep, s: s.split(sep),
    "concat": lambda *lists: [x for lst in lists for x in lst],
    "startswith": lambda s, p: s.startswith(p),
    "endswith": lambda s, p: s.endswith(p),
    "strcontains": lambda s, p: p in s,
    "min": min,
    "max": max,
    "abspath": lambda p: os.path.abspath(p),
    "fileexists": lambda p: Path(p).is_file(),
    "lookup": lambda m, k, default=None: m.get(k, default),
}


@dataclass
class Resource:
    """`TYPE.NAME` (or one instance of it, `TYPE.NAME[key]`) as an expression sees it."""

    deployment: Deployment
    kind: str  # "resource" or "data"
    rtype: str
    name: str
    key: Any = None

    @property
    def body(self) -> dict[str, Any]:
        blocks = self.deployment.module.resources if self.kind == "resource" else \
            self.deployment.module.data
        return blocks[self.rtype][self.name]

    def instances(self) -> dict[str, Resource]:
        keys = self.deployment.for_each(self.body)
        return {k: Resource(self.deployment, self.kind, self.rtype, self.name, k) for k in keys}

    def scope(self) -> dict[str, Any]:
        if self.key is None:
            return {}
        values = self.deployment.for_each(self.body)
        return {"each": {"key": self.key, "value": values[self.key]}}

    def attribute(self, path: tuple[Any, ...]) -> Any:
        """The value at `path` below this instance: from its arguments when they hold it,
        otherwise computed by the provider (the deployment's `computed` hook)."""
        value: Any = self.body
        for i, part in enumerate(path):
            indexable = ((isinstance(value, list) and isinstance(part, int) and part < len(value))
                         or (isinstance(value, dict) and part in value))
            if indexable:
                value = value[part]
            else:
                where = (self.kind, self.rtype, self.name, self.key, tuple(path[:i + 1]))
                return self.deployment.computed_value(where, path[i + 1:], self)
        return self.deployment.evaluate(value, self.scope())


@dataclass
class _Path:
    """A traversal into a resource not yet resolved to a value (a block list, say)."""

    resource: Resource
    path: tuple[Any, ...]


class Deployment:
    """One module, its variables set, its expressions evaluated on demand."""

    def __init__(self, module: Module, variables: Mapping[str, Any],
                 computed: Callable[[tuple[Any, ...], Resource], Any] | None = None,
                 path_root: Path | None = None):
        self.module = module
        self.variables = dict(variables)
        self.computed = computed
        self.path_root = path_root or module.path
        self._locals: dict[str, Any] = {}

    # -- construction ------------------------------------------------------------

    @classmethod
    def of(cls, module_dir: Path, inputs: Mapping[str, Any],
           computed: Callable[[tuple[Any, ...], Resource], Any] | None = None) -> Deployment:
        module = Module.read(module_dir)
        missing = [n for n, v in module.variables.items() if "default" not in v and n not in inputs]
        if missing:
            raise Unsupported(f"{module_dir}: no value for variable(s) {missing}")
        values = {}
        for name, spec in module.variables.items():
            default = spec.get("default")
            values[name] = inputs[name] if name in inputs else _plain(default)
        unknown = set(inputs) - set(module.variables)
        if unknown:
            raise Unsupported(f"{module_dir}: inputs {sorted(unknown)} are not variables")
        return cls(module, values, computed)

    @classmethod
    def minimal(cls, computed: Callable[[tuple[Any, ...], Resource], Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Deployment:
        """The root module with the inputs `terraform/examples/minimal` gives it, the
        example's variables taken from its `terraform.tfvars.example` (and `overrides`)."""
        example = Module.read(MINIMAL)
        tfvars = _clean(_tfvars(MINIMAL / "terraform.tfvars.example"))
        example_values = {}
        for name, spec in example.variables.items():
            raw = tfvars.get(name, spec.get("default"))
            example_values[name] = _plain(raw)
        example_values.update(overrides or {})
        outer = cls(example, example_values)
        (call,) = example.modules.values()
        source = (MINIMAL / outer.evaluate(call["source"])).resolve()
        inputs = {k: outer.evaluate(v) for k, v in call.items() if k not in {"source", "providers"}}
        return cls.of(source, inputs, computed)

    # -- evaluation --------------------------------------------------------------

    def local(self, name: str) -> Any:
        if name not in self._locals:
            if name not in self.module.locals:
                raise Unsupported(f"no local.{name}")
            self._locals[name] = self.evaluate(self.module.locals[name])
        return self._locals[name]

    def evaluate(self, raw: Any, scope: Mapping[str, Any] | None = None) -> Any:
        """A value as python-hcl2 read it (a string holding an expression, a list, a map)."""
        scope = scope or {}
        if isinstance(raw, dict):
            return {k: self.evaluate(v, scope) for k, v in raw.items()}
        if isinstance(raw, list):
            return [self.evaluate(v, scope) for v in raw]
        node = _raw_node(raw)
        return self._value(self._eval(node, scope)) if isinstance(node, Node) else node

    def for_each(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if "for_each" not in body:
            raise Unsupported("an indexed reference to a resource without for_each")
        value = self.evaluate(body["for_each"])
        if isinstance(value, list):
            return {str(v): v for v in value}
        return dict(value)

    def computed_value(self, where: tuple[Any, ...], rest: tuple[Any, ...],
                       resource: Resource) -> Any:
        if self.computed is None:
            raise Unresolved(f"{where} is computed by the provider")
        value = self.computed(where, resource)
        for part in rest:
            value = value[part]
        return value

    def resource(self, rtype: str, name: str, key: Any = None) -> Resource:
        return Resource(self, "resource", rtype, name, key)

    def _value(self, v: Any) -> Any:
        if isinstance(v, _Path):
            return v.resource.attribute(v.path)
        if isinstance(v, Resource):
            if v.key is None and "for_each" in v.body:
                return {k: r for k, r in v.instances().items()}
            return v
        return v

    def _eval(self, node: Node, scope: Mapping[str, Any]) -> Any:
        kind, args = node.kind, node.args
        if kind == "lit":
            return args[0]
        if kind == "template":
            if len(args) == 1 and isinstance(args[0], Node):
                return self._value(self._eval(args[0], scope))
            return "".join(a if isinstance(a, str) else _tostring(self._value(self._eval(a, scope)))
                           for a in args)
        if kind == "ref":
            return self._root(args[0], scope)
        if kind == "get":
            base = self._eval(args[0], scope)
            key = self._value(self._eval(args[1], scope))
            return self._get(base, key)
        if kind == "call":
            name, call_args, expand = args
            if name in ("try", "can"):
                try:
                    value = self._value(self._eval(call_args[0], scope))
                    return True if name == "can" else value
                except (Unsupported, Unresolved, KeyError, IndexError, TypeError):
                    if name == "can":
                        return False
                    return self._value(self._eval(call_args[1], scope))
            if name not in FUNCTIONS:
                raise Unsupported(f"function {name}()")
            values = [self._value(self._eval(a, scope)) for a in call_args]
            if expand:
                values = [*values[:-1], *values[-1]]
            return FUNCTIONS[name](*values)
        if kind == "op":
            op, left, right = args
            a = self._value(self._eval(left, scope))
            if op == "&&":
                return bool(a) and bool(self._value(self._eval(right, scope)))
            if op == "||":
                return bool(a) or bool(self._value(self._eval(right, scope)))
            b = self._value(self._eval(right, scope))
            ops: dict[str, Callable[[Any, Any], Any]] = {
                "==": lambda x, y: x == y, "!=": lambda x, y: x != y,
                "<": lambda x, y: x < y, ">": lambda x, y: x > y,
                "<=": lambda x, y: x <= y, ">=": lambda x, y: x >= y,
                "+": lambda x, y: x + y, "-": lambda x, y: x - y,
                "*": lambda x, y: x * y, "/": lambda x, y: x / y, "%": lambda x, y: x % y,
            }
            return ops[op](a, b)
        if kind == "not":
            return not self._value(self._eval(args[0], scope))
        if kind == "neg":
            return -self._value(self._eval(args[0], scope))
        if kind == "cond":
            chosen = args[1] if self._value(self._eval(args[0], scope)) else args[2]
            return self._eval(chosen, scope)
        if kind == "list":
            return [self._value(self._eval(a, scope)) for a in args]
        if kind == "map":
            return {_tostring(self._value(self._eval(k, scope))): self._value(self._eval(v, scope))
                    for k, v in args}
        if kind in ("for_list", "for_map"):
            return self._for(kind, args, scope)
        raise Unsupported(kind)

    def _for(self, kind: str, args: tuple[Any, ...], scope: Mapping[str, Any]) -> Any:
        names, source = args[0], self._value(self._eval(args[1], scope))
        pairs = list(source.items()) if isinstance(source, dict) else list(enumerate(source))
        out_list: list[Any] = []
        out_map: dict[str, Any] = {}
        for k, v in pairs:
            inner = dict(scope)
            if len(names) == 2:
                inner[names[0]], inner[names[1]] = k, v
            else:
                inner[names[0]] = v
            cond = args[-1]
            if cond is not None and not self._value(self._eval(cond, inner)):
                continue
            if kind == "for_list":
                out_list.append(self._value(self._eval(args[2], inner)))
            else:
                out_map[_tostring(self._value(self._eval(args[2], inner)))] = self._value(
                    self._eval(args[3], inner))
        return out_list if kind == "for_list" else out_map

    def _root(self, name: str, scope: Mapping[str, Any]) -> Any:
        if name in scope:
            return scope[name]
        if name == "var":
            return self.variables
        if name == "local":
            return _LocalView(self)
        if name == "path":
            return {"module": str(self.path_root), "root": str(self.path_root),
                    "cwd": str(self.path_root)}
        if name == "data":
            return _Kinds(self, "data")
        if name in self.module.resources:
            return _Names(self, "resource", name)
        raise Unsupported(f"reference {name}")

    def _get(self, base: Any, key: Any) -> Any:
        if isinstance(base, _LocalView):
            return base.deployment.local(key)
        if isinstance(base, _Kinds):
            return _Names(base.deployment, base.kind, key)
        if isinstance(base, _Names):
            return Resource(base.deployment, base.kind, base.rtype, key)
        if isinstance(base, Resource):
            if base.key is None and "for_each" in base.body:
                return Resource(self, base.kind, base.rtype, base.name, _tostring(key))
            return _Path(base, (key,))
        if isinstance(base, _Path):
            return _Path(base.resource, (*base.path, key))
        if isinstance(base, list | tuple):
            return base[int(key)]
        if isinstance(base, dict):
            if key not in base:
                raise KeyError(f"no key {key!r} in {sorted(base)}")
            return base[key]
        raise Unsupported(f"indexing a {type(base).__name__}")


@dataclass
class _LocalView:
    deployment: Deployment


@dataclass
class _Kinds:
    deployment: Deployment
    kind: str


@dataclass
class _Names:
    deployment: Deployment
    kind: str
    rtype: str


def _plain(raw: Any) -> Any:
    """A variable default or tfvars value (literals only) as a Python value."""
    return Deployment(Module(TERRAFORM), {}).evaluate(raw)


def _tfvars(path: Path) -> dict[str, Any]:
    import hcl2

    with path.open(encoding="utf-8") as handle:
        return hcl2.load(handle)  # type: ignore[no-any-return]


# -- the function source archive ----------------------------------------------------


def _glob_regex(pattern: str) -> str:
    """One doublestar pattern component -> regex (`*`, `?`, `[…]`, `{a,b}`)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            if body[:1] in "!^" and body:
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end
        elif c == "{":
            end = pattern.index("}", i)
            out.append("(?:" + "|".join(_glob_regex(p) for p in pattern[i + 1:end].split(","))
                       + ")")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@cache
def doublestar(pattern: str) -> re.Pattern[str]:
    """doublestar.PathMatch(pattern, path) as a regex: `**` spans whole directories."""
    parts = pattern.split("/")
    regex = ""
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _glob_regex(part) + ("" if last else "/")
    return re.compile(regex + r"\Z")


def excluded(relative: str, excludes: list[str]) -> bool:
    return any(doublestar(p).match(relative) for p in excludes if p)


def archive_files(source_dir: Path, excludes: list[str]) -> Iterator[tuple[str, Path]]:
    """(name in the archive, file) in the order `filepath.Walk` visits them."""

    def walk(folder: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            relative = f"{prefix}{entry.name}"
            if excluded(relative, excludes):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from walk(Path(entry.path), relative + "/")
            elif entry.is_file():
                yield relative, Path(entry.path)

    yield from walk(source_dir, "")


@dataclass(frozen=True)
class Archive:
    path: Path
    names: tuple[str, ...]
    sha256: str  # of the names and contents: the same files give the same key


def function_archive(deployment: Deployment, output: Path | None = None) -> Archive:
    """`data.archive_file.source` of the deployment, written to `output` (default: its
    own output_path)."""
    spec = deployment.module.data["archive_file"]["source"]
    source_dir = Path(deployment.evaluate(spec["source_dir"])).resolve()
    excludes = deployment.evaluate(spec["excludes"])
    target = output or Path(deployment.evaluate(spec["output_path"]))
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    names = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in archive_files(source_dir, excludes):
            data = path.read_bytes()
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            names.append(name)
    return Archive(target, tuple(names), digest.hexdigest())


def main(argv: list[str]) -> int:
    if argv[:1] != ["archive"]:
        print("usage: python -m scripts.deployment archive", file=sys.stderr)
        return 2
    deployment = Deployment.minimal()
    archive = function_archive(deployment)
    for name in archive.names:
        print(name)
    print(f"{archive.path}: {len(archive.names)} files, content sha256 {archive.sha256[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
