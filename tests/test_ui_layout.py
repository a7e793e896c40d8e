"""The geometry of the UI's pictures: the DAG's layered drawing and the timeline."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.ui import layout


def _overlap(a: layout.Node, b: layout.Node) -> bool:
    return a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h and b.y < a.y + a.h


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, str]]]:
    n = draw(st.integers(1, 25))
    names = [f"t{i}" for i in range(n)]
    edges = [(names[i], names[j]) for i, j in itertools.combinations(range(n), 2)
             if draw(st.booleans()) and draw(st.integers(0, 3)) == 0]
    order = draw(st.permutations(names))  # the input order need not be topological
    return list(order), edges


@settings(max_examples=100, deadline=None)
@given(dags())
def test_every_task_is_drawn_once_right_of_its_parents_and_no_two_boxes_overlap(dag):
    tasks, edges = dag
    g = layout.dag(tasks, edges)
    assert sorted(n.name for n in g.nodes) == sorted(tasks)
    at = {n.name: n for n in g.nodes}
    for p, c in edges:
        assert at[p].x + at[p].w < at[c].x, (p, c)
    for a, b in itertools.combinations(g.nodes, 2):
        assert not _overlap(a, b), (a, b)
    for n in g.nodes:
        assert n.x >= 0 and n.x + n.w <= g.width and n.y >= 0 and n.y + n.h <= g.height
    assert len(g.edges) == len(edges)


def test_a_fan_in_is_drawn_in_three_columns_with_the_join_centred():
    edges = [("extract", f"load_{i}") for i in range(4)] + [(f"load_{i}", "combine")
                                                            for i in range(4)]
    g = layout.dag(["extract", *[f"load_{i}" for i in range(4)], "combine"], edges,
                   {"extract": "SUCCESS", "combine": "UPSTREAM_FAILED"})
    at = {n.name: n for n in g.nodes}
    assert len({n.x for n in g.nodes}) == 3
    loads = sorted(at[f"load_{i}"].y for i in range(4))
    middle = (loads[0] + loads[-1]) / 2
    assert abs(at["combine"].y - middle) < 1 and abs(at["extract"].y - middle) < 1
    assert at["combine"].status == "UPSTREAM_FAILED" and at["combine"].note == "UPSTREAM_FAILED"
    assert next(e for e in g.edges if e.parent == "extract").status == "SUCCESS"


def test_barycenter_ordering_uncrosses_two_chains_given_in_crossed_order():
    # a1→b2 and a2→b1 listed so that the first layer's order would cross both edges.
    g = layout.dag(["a1", "a2", "b1", "b2"], [("a1", "b2"), ("a2", "b1")])
    at = {n.name: n for n in g.nodes}
    assert (at["a1"].y < at["a2"].y) == (at["b2"].y < at["b1"].y)


def test_the_timeline_places_attempts_on_one_time_axis():
    t0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    spans = [("a #1", "/a", t0, t0 + timedelta(seconds=10), "ERROR", ""),
             ("a #2", "/a", t0 + timedelta(seconds=20), t0 + timedelta(seconds=40), "SUCCESS", ""),
             ("b #1", "/b", t0 + timedelta(seconds=30), None, "RUNNING", "")]
    chart = layout.timeline(spans, t0, now=t0 + timedelta(seconds=40))
    a1, a2, b1 = chart.bars
    scale = layout.PLOT_W / 40
    assert a1.x == layout.LABEL_W and abs(a1.w - 10 * scale) < 1e-6
    assert abs(a2.x - (layout.LABEL_W + 20 * scale)) < 1e-6
    assert abs(b1.x + b1.w - (layout.LABEL_W + layout.PLOT_W)) < 1e-6  # open: up to now
    assert a1.y < a2.y < b1.y
    assert [t.label for t in chart.ticks] == ["+0 s", "+10 s", "+20 s", "+30 s", "+40 s"]


def test_durations_read_like_a_person_wrote_them():
    assert [layout.seconds(v) for v in (None, 0.04, 3.25, 42, 185, 7260)] == [
        "", "0.04 s", "3.2 s", "42 s", "3 min 5 s", "2 h 1 min"]
