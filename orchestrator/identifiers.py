"""Table and dataset names from pipeline files and messages, checked before use.

Names end up in SQL text (DuckDB has no way to bind an identifier) and in
BigQuery resource paths, so anything outside a strict, boring alphabet is
refused with a message that says which part is wrong and why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import PermanentError

# Stricter than BigQuery (which allows Unicode letters, dashes and spaces in table
# names) on purpose: the same name has to work unquoted in DuckDB and BigQuery.
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
# BigQuery project ids: lowercase letters, digits and dashes, 6 to 30 characters.
PROJECT_RE = re.compile(r"^[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
DEFAULT_DATASET = "analytics"
# Pipeline and task names.
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,127}$")
# Batch ids travel in messages, object paths and SQL parameters: keep them boring.
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-=:]{0,127}$")


BATCH_ID_MAX = 128
BATCH_ID_RULE = "use 1 to 128 ASCII letters, digits and _ . - = :, starting with a letter or digit"
_BATCH_ID_CHAR = re.compile(r"[A-Za-z0-9_.\-=:]")
_NAMED_CHARS = {" ": "a space", "/": "a slash", "\\": "a backslash", "'": "a quote",
                '"': "a quote", "`": "a backquote", "\t": "a tab", "\n": "a line break"}


def valid_batch_id(value: str) -> bool:
    # fullmatch: `$` alone would let a trailing line break through.
    return bool(BATCH_ID_RE.fullmatch(value)) and ".." not in value


def batch_id_problem(value: str) -> str | None:
    """What is wrong with a batch id, as one line that names it (None if it is valid)."""
    if valid_batch_id(value):
        return None
    shown = repr(value) if len(value) <= 60 else repr(value[:40]) + "…"
    if not value:
        why = "it is empty"
    elif len(value) > BATCH_ID_MAX:
        why = f"it is {len(value)} characters long, at most {BATCH_ID_MAX}"
    elif (bad := next((c for c in value if not _BATCH_ID_CHAR.fullmatch(c)), None)) is not None:
        named = _NAMED_CHARS.get(bad)
        if named is None:
            named = (f"the non-ASCII character {bad!r}" if not bad.isascii()
                     else f"the character {bad!r}")
        why = f"it contains {named}"
    elif ".." in value:
        why = "it contains '..'"
    else:
        why = f"it starts with {value[0]!r}"
    return f"invalid batch id {shown}: {why}; {BATCH_ID_RULE}"


class InvalidIdentifier(PermanentError, ValueError):
    """A table, dataset, column or project name that is not allowed."""


def check_identifier(name: object, what: str = "identifier", within: str | None = None) -> str:
    if not isinstance(name, str) or not IDENT_RE.match(name):
        where = f" in {within!r}" if within is not None else ""
        raise InvalidIdentifier(
            f"invalid {what} {name!r}{where}: use letters, digits and _ "
            "(not starting with a digit)"
        )
    return name


@dataclass(frozen=True)
class TableRef:
    dataset: str
    table: str
    project: str | None = None

    @property
    def name(self) -> str:
        """`dataset.table`, the form shown to users and stored in task output."""
        return f"{self.dataset}.{self.table}"

    def bigquery_id(self, default_project: str) -> str:
        return f"{self.project or default_project}.{self.dataset}.{self.table}"


def parse_table(name: object, default_dataset: str | None = None) -> TableRef:
    """`table`, `dataset.table` or `project.dataset.table`, each part validated."""
    if not isinstance(name, str) or not name:
        raise InvalidIdentifier(f"invalid table name {name!r}: expected 'dataset.table' or 'table'")
    parts = name.split(".")
    if len(parts) > 3:
        raise InvalidIdentifier(
            f"invalid table name {name!r}: at most project.dataset.table"
        )
    project: str | None = None
    if len(parts) == 3:
        project = parts.pop(0)
        if not PROJECT_RE.match(project):
            raise InvalidIdentifier(f"invalid project id {project!r} in table name {name!r}")
    if len(parts) == 2:
        dataset, table = parts
    else:
        dataset, table = default_dataset or DEFAULT_DATASET, parts[0]
    check_identifier(dataset, "dataset name", name if len(parts) == 2 else None)
    check_identifier(table, "table name", name if len(parts) == 2 else None)
    return TableRef(dataset=dataset, table=table, project=project)


def table_problems(name: object) -> list[str]:
    """The problems of a table name as sync-time messages (empty if it is fine)."""
    try:
        parse_table(name)
    except InvalidIdentifier as exc:
        return [str(exc)]
    return []


_JOB_ID_BAD = re.compile(r"[^A-Za-z0-9_\-]")
JOB_ID_MAX = 1024


def safe_job_id(key: str) -> str:
    """A BigQuery job id (`[A-Za-z0-9_-]`, at most 1024 characters) for `key`.

    Deterministic, so a redelivered attempt asks for the same job. When the key
    had to be changed (a `.` in a batch id, say), a digest of the original is
    appended so that two different keys never share a job id.
    """
    import hashlib

    cleaned = _JOB_ID_BAD.sub("_", key)
    if cleaned == key and len(key) <= JOB_ID_MAX:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{cleaned[: JOB_ID_MAX - 17]}_{digest}"
