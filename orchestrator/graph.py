"""A pipeline's DAG as Mermaid or Graphviz DOT text, optionally colored by a batch's statuses.

Pure functions over names and edges; the CLI feeds them from the metadata database.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# Fill and text colors per task status (the same palette for both formats).
COLORS: dict[str, tuple[str, str]] = {
    "PENDING": ("#e5e7eb", "#111827"),
    "QUEUED": ("#bfdbfe", "#1e3a8a"),
    "RUNNING": ("#fde68a", "#78350f"),
    "RETRYING": ("#fdba74", "#7c2d12"),
    "SUCCESS": ("#86efac", "#14532d"),
    "ERROR": ("#fca5a5", "#7f1d1d"),
    "UPSTREAM_FAILED": ("#fecaca", "#7f1d1d"),
    "SKIPPED": ("#f3f4f6", "#6b7280"),
    "CANCELLED": ("#d1d5db", "#374151"),
}

FORMATS = ("mermaid", "dot")


def _node_id(name: str) -> str:
    # Task names allow '-', which neither format takes in a bare identifier.
    return "t_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def mermaid(tasks: Sequence[str], edges: Sequence[tuple[str, str]],
            statuses: Mapping[str, str] | None = None, title: str | None = None) -> str:
    """`edges` are (parent, child) pairs; `statuses` maps a task to its status."""
    lines = []
    if title:
        lines += ["---", f"title: {title}", "---"]
    lines.append("flowchart LR")
    for t in tasks:
        label = f"{t}<br/>{statuses[t]}" if statuses and t in statuses else t
        lines.append(f'    {_node_id(t)}["{label}"]')
    for parent, child in edges:
        lines.append(f"    {_node_id(parent)} --> {_node_id(child)}")
    if statuses:
        used = sorted({s for s in statuses.values() if s in COLORS})
        for s in used:
            fill, text = COLORS[s]
            lines.append(f"    classDef {s.lower()} fill:{fill},color:{text},stroke:{text}")
        for t in tasks:
            status = statuses.get(t)
            if status is not None and status in COLORS:
                lines.append(f"    class {_node_id(t)} {status.lower()}")
    return "\n".join(lines) + "\n"


def dot(tasks: Sequence[str], edges: Sequence[tuple[str, str]],
        statuses: Mapping[str, str] | None = None, title: str | None = None) -> str:
    name = title or "pipeline"
    lines = [f'digraph "{name}" {{', "    rankdir=LR;",
             '    node [shape=box, style="rounded,filled", fillcolor="#ffffff"];']
    for t in tasks:
        s = statuses.get(t) if statuses else None
        if s:
            fill, text = COLORS.get(s, ("#ffffff", "#000000"))
            lines.append(f'    {_node_id(t)} [label="{t}\\n{s}", fillcolor="{fill}", '
                         f'fontcolor="{text}"];')
        else:
            lines.append(f'    {_node_id(t)} [label="{t}"];')
    for parent, child in edges:
        lines.append(f"    {_node_id(parent)} -> {_node_id(child)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(fmt: str, tasks: Sequence[str], edges: Sequence[tuple[str, str]],
           statuses: Mapping[str, str] | None = None, title: str | None = None) -> str:
    if fmt == "mermaid":
        return mermaid(tasks, edges, statuses, title)
    if fmt == "dot":
        return dot(tasks, edges, statuses, title)
    raise ValueError(f"unknown graph format {fmt!r}: use one of {', '.join(FORMATS)}")
