"""Logical names of buckets and datasets, and the real names they stand for.

A pipeline names its buckets and datasets logically (`gs://landing/…`,
`analytics.sales`) so that the same file runs locally, on the emulators and in
the cloud. `ORCHESTRATOR_BUCKETS` and `ORCHESTRATOR_DATASETS` map a logical name
to the real one (terraform sets both); a name not listed is its own real name,
which is the local default.

The core only ever sees logical names: the Google Cloud adapters translate on
the way out (a URI to read, a table to load) and the edge translates a finalized
object's real bucket on the way in, so that it matches the pipeline's trigger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.settings import Settings
    from orchestrator.storage_events import StorageObject


@dataclass(frozen=True)
class NameMap:
    buckets: Mapping[str, str] = field(default_factory=dict)
    datasets: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> NameMap:
        return cls(dict(settings.buckets), dict(settings.datasets))

    # -- buckets ------------------------------------------------------------------------

    def real_bucket(self, logical: str) -> str:
        return self.buckets.get(logical, logical)

    def logical_bucket(self, real: str) -> str:
        for logical, name in self.buckets.items():
            if name == real:
                return logical
        return real

    def real_uri(self, uri: str) -> str:
        """`gs://landing/a/b` -> `gs://<real landing>/a/b`; anything else unchanged."""
        if not uri.startswith("gs://"):
            return uri
        bucket, sep, rest = uri[5:].partition("/")
        return f"gs://{self.real_bucket(bucket)}{sep}{rest}"

    def logical_uri(self, uri: str) -> str:
        if not uri.startswith("gs://"):
            return uri
        bucket, sep, rest = uri[5:].partition("/")
        return f"gs://{self.logical_bucket(bucket)}{sep}{rest}"

    def logical_object(self, obj: StorageObject) -> StorageObject:
        """A finalized object as the pipelines name it (its bucket's logical name)."""
        logical = self.logical_bucket(obj.bucket)
        return obj if logical == obj.bucket else obj.model_copy(update={"bucket": logical})

    # -- datasets -----------------------------------------------------------------------

    def real_dataset(self, logical: str) -> str:
        return self.datasets.get(logical, logical)

    def rewrite_sql(self, sql: str) -> str:
        """BigQuery SQL with every `dataset.table` of a mapped dataset renamed to the real
        dataset. A name with a project (`project.dataset.table`) is already real and kept;
        an unqualified name resolves through the default dataset. SQL that names no mapped
        dataset is returned as it was, byte for byte."""
        renames = {k: v for k, v in self.datasets.items() if k != v}
        if not renames or not any(k in sql for k in renames):
            return sql
        import sqlglot
        from sqlglot import exp

        try:
            statements = sqlglot.parse(sql, read="bigquery")
        except sqlglot.errors.ParseError:
            # The warehouse reports the syntax error, with its own position, on the real text.
            return sql
        changed = False
        for statement in statements:
            if statement is None:
                continue
            for table in statement.find_all(exp.Table):
                if table.args.get("catalog") is None and table.db in renames:
                    table.set("db", exp.to_identifier(renames[table.db]))
                    changed = True
        if not changed:
            return sql
        return ";\n".join(s.sql(dialect="bigquery") for s in statements if s is not None)

