"""Rich tables for the CLI: a batch's status, recent batches, events, pipelines."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STYLE = {
    "PENDING": "dim",
    "QUEUED": "blue",
    "RUNNING": "yellow",
    "RETRYING": "dark_orange",
    "SUCCESS": "green",
    "ERROR": "bold red",
    "UPSTREAM_FAILED": "red",
    "SKIPPED": "dim",
    "CANCELLED": "magenta",
    "FAILED": "bold red",
}


ALERT_STYLE = {"error": "bold red", "warning": "dark_orange", "info": "green"}


def status_text(status: str | None) -> Text:
    return Text(status or "", style=STYLE.get(status or "", ""))


def clock_time(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%H:%M:%S")


def date_time(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def first_line(text: str | None, limit: int = 120) -> str:
    if not text or not text.strip():
        return ""
    line = text.strip().splitlines()[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def counts_text(counts: dict[str, int]) -> Text:
    out = Text()
    for i, (status, n) in enumerate(counts.items()):
        if i:
            out.append("  ")
        out.append(f"{n} ", style="bold")
        out.append(status, style=STYLE.get(status, ""))
    return out


def batch_header(doc: dict[str, Any]) -> Text:
    head = Text()
    head.append(f"{doc['pipeline']} ", style="bold")
    head.append(f"{doc['batch_id']}  ", style="bold cyan")
    head.append_text(status_text(doc["status"]))
    n = len(doc["tasks"])
    head.append(f"  ·  {n} task{'s' if n != 1 else ''}: ")
    head.append_text(counts_text(doc["counts"]))
    if doc.get("duration_s") is not None:
        head.append(f"  ·  {seconds(doc['duration_s'])}")
    if doc.get("deadline_at") and doc["status"] == "RUNNING":
        head.append(f"  ·  deadline {date_time(doc['deadline_at'])} UTC", style="dark_orange")
    return head


def batch_table(doc: dict[str, Any]) -> Group:
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("task")
    table.add_column("status")
    table.add_column("attempt", justify="right")
    table.add_column("started (UTC)")
    table.add_column("duration", justify="right")
    table.add_column("error", overflow="fold")
    for t in doc["tasks"]:
        started = t["started_at"] is not None
        error = first_line(t["error"])
        if not error and t["waiting_for_file"]:
            error = Text("waiting for its file", style="dim")  # type: ignore[assignment]
        instances = t.get("instances")
        name = t["task"] if not instances else f"{t['task']}[0..{instances['total'] - 1}]"
        table.add_row(
            name, status_text(t["status"]),
            f"{t['attempt']}/{t['max_attempts']}" if started else "",
            clock_time(t["started_at"]), seconds(t["duration_s"]), error,
        )
    return Group(batch_header(doc), table)


def recent_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for col in ("pipeline", "batch", "status", "created (UTC)", "duration", "tasks"):
        table.add_column(col, justify="right" if col == "duration" else "left")
    for r in rows:
        table.add_row(r["pipeline"], r["batch_id"], status_text(r["status"]),
                      date_time(r["created_at"]), seconds(r["duration_s"]),
                      counts_text(r["counts"]))
    return table


def events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for col in ("at (UTC)", "task", "attempt", "from", "to", "detail"):
        table.add_column(col, overflow="fold" if col == "detail" else "ellipsis")
    for e in events:
        detail = e["detail"] or {}
        text = "; ".join(f"{k}={first_line(str(v), 70)}" for k, v in detail.items())
        table.add_row(clock_time(e["at"]), e["task"] or "(batch)",
                      str(e["attempt"] or ""), status_text(e["from"]), status_text(e["to"]),
                      text)
    return table


def pipelines_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for col in ("pipeline", "version", "tasks", "updated (UTC)", "description"):
        table.add_column(col, overflow="fold" if col == "description" else "ellipsis")
    for r in rows:
        table.add_row(r["pipeline"], str(r["version"]), str(r["tasks"]),
                      date_time(r["updated_at"]), r["description"])
    return table


def pipeline_table(doc: dict[str, Any]) -> Group:
    head = Text()
    head.append(f"{doc['pipeline']}", style="bold")
    head.append(f"  version {doc['version']}")
    if doc.get("source_file"):
        head.append(f" from {doc['source_file']}")
    if doc["description"]:
        head.append(f"  ·  {doc['description']}")
    lines = [head, Text(f"trigger: {triggers_text(doc)}")]
    if doc.get("concurrency"):
        lines.append(Text(f"concurrency: {doc['concurrency']} running task(s) per batch"))
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for col in ("task", "handler", "depends on", "trigger rule", "attempts", "timeout",
                "concurrency", "map over", "file trigger"):
        table.add_column(col, overflow="fold")
    for t in doc["tasks"]:
        table.add_row(t["task"], t["handler"], ", ".join(t["depends_on"]), t["trigger_rule"],
                      str(t["max_attempts"]), seconds(t["timeout_s"]),
                      str(t["concurrency"]) if t.get("concurrency") else "",
                      map_over_text(t.get("map_over")), t["gcs_trigger"] or "")
    return Group(*lines, table)


def triggers_text(doc: dict[str, Any]) -> str:
    """What starts a batch of the pipeline besides `batch start`: its schedule, its files."""
    ways = []
    if doc.get("schedule"):
        s = doc["schedule"]
        ways.append(f"schedule {s['cron']} {s['timezone']} (batch id {s['batch_id']})")
    ways.extend(f"file {t['gcs_trigger']} (task {t['task']})" for t in doc["tasks"]
                if t["gcs_trigger"])
    return "; ".join(ways) or "none (start batches with `orchestrator batch start`)"


def map_over_text(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    source = m.get("parent_output") or f"objects under {m.get('gcs_prefix')}"
    return f"{source} (max {m.get('max_instances', 1000)})"


def schedules_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for col in ("pipeline", "cron", "time zone", "batch id", "state", "last run", "next runs"):
        table.add_column(col, overflow="fold")
    for r in rows:
        last = Text()
        if r["last_batch_id"]:
            last = Text(f"{r['last_batch_id']} ")
            last.append_text(status_text(r["last_status"]))
        table.add_row(r["pipeline"], r["cron"], r["timezone"], r["batch_id"],
                      Text("paused", style="magenta") if r["paused"] else Text("active"),
                      last, "\n".join(date_time(n) for n in r["next"]))
    return table


def alerts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for col in ("id", "at (UTC)", "kind", "batch", "task", "title", "delivery"):
        table.add_column(col, overflow="fold" if col in ("title", "delivery") else "ellipsis")
    for r in rows:
        delivery = ", ".join(f"{d['channel']} {d['state']}" for d in r["deliveries"]) or "none"
        table.add_row(str(r["id"]), date_time(r["created_at"]),
                      Text(r["kind"], style=ALERT_STYLE.get(r["severity"], "")),
                      f"{r['pipeline']}/{r['batch_id']}", r["task"] or "", r["title"], delivery)
    return table
