"""Pipeline definitions from YAML files or Python dicts, validated whole.

The structure (`spec`) and each handler's own config check (`checks`) are judged
here together, so a file's every problem is reported at once; what passes is
returned ready to sync, with what only the pipeline folder holds (SQL files)
inlined.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import PipelineValidationError
from orchestrator.pipeline.checks import prepare_spec, task_config_problems
from orchestrator.pipeline.spec import PipelineSpec, parse_definition


def build_pipeline(
    data: Any,
    *,
    source: str = "<pipeline>",
    base_dir: Path | None = None,
    known_handlers: Iterable[str] | None = None,
) -> PipelineSpec:
    """Validate a definition (a dict, as from YAML) and return the spec, or raise
    `PipelineValidationError` listing every problem found."""
    if known_handlers is None:
        from orchestrator import handlers

        known_handlers = handlers.names()
    parsed = parse_definition(data, base_dir=base_dir, known_handlers=known_handlers)
    spec = parsed.spec
    # In the same pass as the structure, so a user fixes a file in one go.
    problems = parsed.problems + task_config_problems(parsed.tasks, base_dir)
    if problems:
        raise PipelineValidationError(source, list(dict.fromkeys(problems)))
    assert spec is not None
    # Inline what only the pipeline folder holds (SQL files), so the stored
    # definition is self-contained and its hash covers the SQL text.
    return prepare_spec(spec)


# How many values aliases may add to a file once expanded. Aliases share one object
# when loaded, but validation and hashing walk the expanded tree: a few hundred bytes
# of nested aliases (an "alias bomb") expand to billions of values.
MAX_ALIAS_EXPANSION = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing a document whose aliases expand beyond the bound
    (or refer to themselves) before anything walks the expanded tree."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            distinct: set[int] = set()
            expanded = _expanded_size(node, {}, set(), distinct)
            if expanded - len(distinct) > MAX_ALIAS_EXPANSION:
                raise yaml.composer.ComposerError(
                    None, None, f"its aliases expand to {expanded:,} values, more than "
                    f"{MAX_ALIAS_EXPANSION:,} beyond the file's own; write the repeated parts "
                    "out or nest fewer aliases", node.start_mark)
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int],
                   distinct: set[int]) -> int:
    """The number of values the node stands for with every alias written out, counted
    once per distinct node (so in time linear in the file, however large the answer)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(
            None, None, "an alias refers to a value that contains it", node.start_mark)
    distinct.add(key)
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, sizes, open_, distinct) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_, distinct)
                    + _expanded_size(v, sizes, open_, distinct) for k, v in node.value)
    open_.discard(key)
    sizes[key] = size
    return size


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line with its place, 1-based, as an editor counts: the
    parser's own text spans several lines and names `<unicode string>`."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return "invalid YAML: " + " ".join(str(exc).split())
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = " ".join((exc.problem or exc.context or "malformed").split())
    context = ""
    if exc.context and exc.problem:
        at = exc.context_mark
        context = f" ({exc.context}" + (f" at line {at.line + 1}, column {at.column + 1}"
                                         if at else "") + ")"
    return f"{where}invalid YAML: {problem}{context}"


def load_pipeline(path: str | Path, *, known_handlers: Iterable[str] | None = None) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineValidationError(str(path), [f"cannot read: {exc.strerror}"]) from exc
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise PipelineValidationError(str(path), [yaml_problem(exc)]) from exc
    spec = build_pipeline(
        data, source=str(path), base_dir=path.resolve().parent, known_handlers=known_handlers
    )
    return spec.model_copy(update={"source_file": path.name})


def load_pipelines(path: str | Path) -> list[PipelineSpec]:
    """One file, or every *.yaml / *.yml file in a folder (sorted). Two files of the
    folder that name the same pipeline are a problem: neither is loaded."""
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        problems: list[str] = []
        specs: list[PipelineSpec] = []
        for f in files:
            try:
                specs.append(load_pipeline(f))
            except PipelineValidationError as exc:
                problems.extend(f"{f.name}: {p}" for p in exc.problems)
        files_of: dict[str, list[str]] = {}
        for spec in specs:
            files_of.setdefault(spec.name, []).append(str(spec.source_file))
        problems.extend(f"pipeline {name!r} is defined by more than one file: {', '.join(named)}"
                        for name, named in files_of.items() if len(named) > 1)
        if problems:
            raise PipelineValidationError(str(path), problems)
        return specs
    return [load_pipeline(path)]
