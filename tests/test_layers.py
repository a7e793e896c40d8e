"""Imports point downward only: the engine imports nothing above it, the units of
the router import each other in one direction, and no two modules import each
other (AST of every module, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the engine may import: itself and the layers below it.
ENGINE_MAY_IMPORT = ("orchestrator.engine", "orchestrator.db", "orchestrator.status",
                     "orchestrator.errors", "orchestrator.identifiers")
# Each router unit, and the units it may use.
UNITS = {
    "orchestrator.dispatcher": set(),
    "orchestrator.alerts": set(),
    "orchestrator.deadlines": {"orchestrator.dispatcher", "orchestrator.alerts"},
    "orchestrator.schedules": {"orchestrator.dispatcher", "orchestrator.deadlines"},
    "orchestrator.worker": {"orchestrator.dispatcher"},
    "orchestrator.sweeper": {"orchestrator.dispatcher", "orchestrator.schedules",
                             "orchestrator.deadlines", "orchestrator.alerts"},
    "orchestrator.triggers": {"orchestrator.dispatcher", "orchestrator.deadlines"},
    "orchestrator.delivery": {"orchestrator.dispatcher", "orchestrator.worker",
                              "orchestrator.deadlines"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("orchestrator/**/*.py"), *ROOT.glob("functions/*.py")]:
        if "migrations" in path.parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Every `orchestrator…` module named by an import statement in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("orchestrator"))
        elif (isinstance(node, ast.ImportFrom) and node.module
              and node.module.startswith("orchestrator")):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def resolved(names: set[str], known: dict[str, Path]) -> set[str]:
    """Imported names -> the modules they live in (`from pkg import name` -> pkg)."""
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def test_the_engine_imports_nothing_above_it() -> None:
    known = modules()
    upward = {
        (m, dep) for m, path in known.items() if m.startswith("orchestrator.engine")
        for dep in resolved(imports(path), known)
        if not dep.startswith(ENGINE_MAY_IMPORT) and dep != "orchestrator"
    }
    assert upward == set()


def test_router_units_use_each_other_in_one_direction_only() -> None:
    known = modules()
    wrong = {
        (unit, dep) for unit, allowed in UNITS.items()
        for dep in resolved(imports(known[unit]), known)
        if (dep in UNITS or dep == "orchestrator.router") and dep != unit and dep not in allowed
    }
    assert wrong == set()


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules a file imports, precisely: `from pkg import sub` imports the module
    `pkg.sub` when there is one, and the package `pkg` only for a name it defines."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names}
        else:
            continue
        out |= resolved({n for n in names if n.startswith("orchestrator")}, known)
    return out


def test_no_two_modules_import_each_other() -> None:
    known = modules()
    deps = {m: imported_modules(path, known) - {m} for m, path in known.items()}
    mutual = {(a, b) for a, imported in deps.items() for b in imported
              if a < b and a in deps.get(b, set())}
    assert mutual == set()
