"""Geometry for the pictures the pages draw as inline SVG: the DAG and the timeline.

Pure functions over names, edges and times; the templates turn the shapes into SVG
elements, so every label goes through the same escaping as the rest of the page.

The DAG uses a layered (Sugiyama-style) drawing, left to right: a task's column is
its longest path from a root, and each column is ordered by the barycenter of its
neighbours for a few sweeps, which untangles the usual fan-in and fan-out shapes.
It costs O((tasks + edges) · sweeps).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

NODE_W = 176
NODE_H = 44
GAP_X = 56
GAP_Y = 18
MARGIN = 12
SWEEPS = 4


@dataclass(frozen=True)
class Node:
    name: str
    x: float
    y: float
    w: float
    h: float
    status: str | None
    note: str  # the second line: status, or a mapped task's instance counts


@dataclass(frozen=True)
class Edge:
    parent: str
    child: str
    path: str  # an SVG path: a cubic curve from the parent's right to the child's left
    status: str | None  # the parent's, so a failed branch shows where it starts


@dataclass(frozen=True)
class Graph:
    width: float
    height: float
    nodes: list[Node]
    edges: list[Edge]


def _topological(tasks: Sequence[str], parents: Mapping[str, Sequence[str]],
                 children: Mapping[str, Sequence[str]]) -> list[str]:
    """Kahn's algorithm, keeping the given order among tasks that are ready together."""
    known = set(tasks)
    rank = {t: i for i, t in enumerate(tasks)}
    indegree = {t: sum(1 for p in parents.get(t, ()) if p in known) for t in tasks}
    ready_keyed = [(rank[t], t) for t in tasks if indegree[t] == 0]
    heapq.heapify(ready_keyed)
    order: list[str] = []
    while ready_keyed:
        _, t = heapq.heappop(ready_keyed)
        order.append(t)
        for c in children.get(t, ()):
            if c in indegree:
                indegree[c] -= 1
                if indegree[c] == 0:
                    heapq.heappush(ready_keyed, (rank[c], c))
    if len(order) < len(tasks):  # a cycle cannot be synced, but never drop a task
        seen = set(order)
        order.extend(t for t in tasks if t not in seen)
    return order


def _layers(tasks: Sequence[str], parents: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Longest path from a root; `tasks` must be in topological order."""
    layer: dict[str, int] = {}
    for t in tasks:
        layer[t] = max((layer[p] + 1 for p in parents.get(t, ()) if p in layer), default=0)
    return layer


def _order(columns: list[list[str]], parents: Mapping[str, Sequence[str]],
           children: Mapping[str, Sequence[str]]) -> None:
    """Reorder each column in place by the mean position of its neighbours."""
    pos = {t: i for col in columns for i, t in enumerate(col)}
    for sweep in range(SWEEPS):
        forward = sweep % 2 == 0
        seq = columns[1:] if forward else list(reversed(columns[:-1]))
        near = parents if forward else children
        for col in seq:
            def key(t: str, near: Mapping[str, Sequence[str]] = near) -> tuple[float, int]:
                ps = [pos[n] for n in near.get(t, ()) if n in pos]
                return (sum(ps) / len(ps) if ps else float(pos[t]), pos[t])

            col.sort(key=key)
            for i, t in enumerate(col):
                pos[t] = i


def dag(tasks: Sequence[str], edges: Sequence[tuple[str, str]],
        statuses: Mapping[str, str] | None = None,
        notes: Mapping[str, str] | None = None) -> Graph:
    """Place `tasks` (in topological order) and route `edges` ((parent, child) pairs)."""
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for p, c in edges:
        parents.setdefault(c, []).append(p)
        children.setdefault(p, []).append(c)
    tasks = _topological(tasks, parents, children)
    layer = _layers(tasks, parents)
    n_cols = max(layer.values(), default=-1) + 1
    columns: list[list[str]] = [[] for _ in range(n_cols)]
    for t in tasks:
        columns[layer[t]].append(t)
    _order(columns, parents, children)
    tallest = max((len(c) for c in columns), default=0)
    height = 2 * MARGIN + tallest * NODE_H + max(0, tallest - 1) * GAP_Y
    width = 2 * MARGIN + n_cols * NODE_W + max(0, n_cols - 1) * GAP_X
    nodes: dict[str, Node] = {}
    for i, col in enumerate(columns):
        span = len(col) * NODE_H + max(0, len(col) - 1) * GAP_Y
        top = (height - span) / 2
        for j, t in enumerate(col):
            status = statuses.get(t) if statuses else None
            note = (notes or {}).get(t) or (status or "")
            nodes[t] = Node(t, MARGIN + i * (NODE_W + GAP_X), top + j * (NODE_H + GAP_Y),
                            NODE_W, NODE_H, status, note)
    routed = []
    for p, c in edges:
        a, b = nodes.get(p), nodes.get(c)
        if a is None or b is None:
            continue
        x1, y1 = a.x + a.w, a.y + a.h / 2
        x2, y2 = b.x, b.y + b.h / 2
        bend = max(GAP_X / 2, (x2 - x1) / 2)
        routed.append(Edge(p, c, f"M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1:.1f} "
                                 f"{x2 - bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}",
                           statuses.get(p) if statuses else None))
    return Graph(width, height, [nodes[t] for t in tasks], routed)


def clip(text: str, limit: int = 22) -> str:
    """A label that fits its box; the full name stays in the node's tooltip."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the timeline -------------------------------------------------------------------------

ROW_H = 18
LABEL_W = 210
PLOT_W = 760


@dataclass(frozen=True)
class Bar:
    label: str
    href: str
    x: float
    y: float
    w: float
    outcome: str
    title: str


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Timeline:
    width: float
    height: float
    label_w: float
    bars: list[Bar]
    ticks: list[Tick]


def seconds(value: float | None) -> str:
    """A duration for people: 0.42 s, 12 s, 3 min 5 s, 2 h 4 min."""
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        m, s = divmod(round(value), 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, rest = divmod(round(value), 3600)
    return f"{h} h {rest // 60} min"


def timeline(spans: Sequence[tuple[str, str, datetime, datetime | None, str, str]],
             start: datetime, now: datetime) -> Timeline:
    """A Gantt chart: one row per (label, href, start, end, outcome, title), the x axis
    from `start` to the last end (an open span ends at `now`)."""
    ends = [e or now for _, _, _, e, _, _ in spans]
    last = max([start, *ends])
    total = max((last - start).total_seconds(), 0.001)
    scale = PLOT_W / total
    bars = []
    for i, (label, href, s, e, outcome, title) in enumerate(spans):
        x = LABEL_W + max(0.0, (s - start).total_seconds()) * scale
        w = max(2.0, ((e or now) - s).total_seconds() * scale)
        bars.append(Bar(label, href, x, 24 + i * ROW_H, min(w, LABEL_W + PLOT_W - x + 2),
                        outcome, title))
    ticks = [Tick(LABEL_W + PLOT_W * k / 4, "+" + (seconds(total * k / 4) if k else "0 s"))
             for k in range(5)]
    return Timeline(LABEL_W + PLOT_W + 48, 24 + len(spans) * ROW_H + 8, LABEL_W, bars, ticks)
