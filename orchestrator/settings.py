"""Settings from the environment only (`ORCHESTRATOR_*`, `DATABASE_URL`).

Every setting says what the deployed functions and job need of it (`cloud=` in its
field): `DEPLOYED` means the deployment must set it (terraform does, a test checks),
a value means it must be set to exactly that, `DEFAULT` means the default is right in
the cloud too, and `LOCAL` means only the embedded runtime reads it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

HOME_DIR = Path(".orchestrator")

DEPLOYED = "deployed"
DEFAULT = "default"
LOCAL = "local"

# GCS bucket names; BigQuery dataset ids (letters, digits, underscores).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
_DATASET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")


def cloud(need: Any) -> dict[str, Any]:
    """The `json_schema_extra` that records what the cloud needs of a setting."""
    return {"cloud": need}


def cloud_need(field: Any) -> Any:
    """What the cloud needs of a field (DEPLOYED, DEFAULT, LOCAL or a value); None if unsaid."""
    extra = field.json_schema_extra
    return extra.get("cloud") if isinstance(extra, dict) else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    home: Path = Field(default=HOME_DIR, description="Folder of the embedded runtime's state.",
                       json_schema_extra=cloud(LOCAL))
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "ORCHESTRATOR_DATABASE_URL"),
        description="SQLAlchemy URL; default: a SQLite file under `home`.",
        json_schema_extra=cloud(DEPLOYED),
    )
    # Kept out of DATABASE_URL so that it can be mounted from Secret Manager.
    db_password: str | None = Field(default=None, json_schema_extra=cloud(DEPLOYED))
    # The deployment's connection budget is computed from these two.
    db_pool_size: int = Field(default=2, json_schema_extra=cloud(DEPLOYED))
    db_max_overflow: int = Field(default=0, json_schema_extra=cloud(DEPLOYED))
    db_pool_timeout_s: float = Field(default=10.0, json_schema_extra=cloud(DEFAULT))
    # Off behind a pooler that gives each transaction another server connection.
    db_prepared_statements: bool = Field(
        default=True, json_schema_extra=cloud(DEFAULT),
        description="Prepare the hot path's statements once per connection (PostgreSQL).")

    gcp_project: str | None = Field(default=None, json_schema_extra=cloud(DEPLOYED))
    tasks_topic: str = Field(default="tasks", json_schema_extra=cloud(DEPLOYED))
    events_topic: str = Field(default="batch-events", json_schema_extra=cloud(DEPLOYED))
    # Relative to the working directory: the source root in a function, /app in the job.
    pipelines_dir: Path = Field(default=Path("pipelines"), json_schema_extra=cloud(DEPLOYED))
    warehouse: str = Field(default="local", description='"local" (DuckDB) or "bigquery".',
                           json_schema_extra=cloud("bigquery"))
    # The dataset of table names without one (`sales`), as pipelines name it.
    bq_dataset: str | None = Field(default=None, json_schema_extra=cloud(DEPLOYED))
    # A job in a regional dataset is found only with its location.
    bq_location: str | None = Field(default=None, json_schema_extra=cloud(DEPLOYED))
    # `table$YYYYMM` partition decorators; bqemulator has none (partitions emptied by DELETE).
    bq_partition_decorators: bool = Field(default=True, json_schema_extra=cloud(DEFAULT))
    object_store: str = Field(default="local", description='"local" (a folder of buckets) or "gcs".',
                              json_schema_extra=cloud("gcs"))
    # Pipelines name buckets and datasets logically (`gs://landing/…`, `analytics.sales`);
    # these map a logical name to the real one. A name not listed is its own real name.
    buckets: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict,
                                                         json_schema_extra=cloud(DEPLOYED))
    datasets: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict,
                                                          json_schema_extra=cloud(DEPLOYED))
    log_format: str = Field(default="text", description='"text" locally, "json" for Cloud Logging.',
                            json_schema_extra=cloud("json"))

    # Sweeper: a QUEUED task nobody claimed within this grace is published again.
    redispatch_after_s: float = Field(default=60.0, json_schema_extra=cloud(DEFAULT))
    # Cap on RUNNING attempts of a task that sets no `concurrency` (None: unlimited).
    default_concurrency: int | None = Field(default=None, ge=1, json_schema_extra=cloud(DEFAULT))
    workers: int = Field(default=4, json_schema_extra=cloud(LOCAL))
    # The embedded runtime on PostgreSQL: this many worker processes instead of the
    # `workers` threads (0: threads), each with its own connections.
    worker_processes: int = Field(default=0, ge=0, json_schema_extra=cloud(LOCAL))
    # A worker that finishes a task runs one of the children it just queued itself,
    # for up to this long per delivery (0 turns it off): no publish, no second hop.
    continuation_s: float = Field(default=30.0, json_schema_extra=cloud(DEFAULT))
    # What one attempt's log keeps of its prints and log lines: the first and the last
    # lines up to this many bytes, with a marker of what was left out between.
    attempt_log_bytes: int = Field(default=64 * 1024, ge=1024, json_schema_extra=cloud(DEFAULT))

    # Alerts go to the `alerts` Pub/Sub topic (cloud) and to a webhook that takes a
    # Slack-compatible message; its URL is a credential (mounted from Secret Manager
    # into sweep when the deployment has one), never written in a pipeline file.
    alerts_topic: str = Field(default="alerts", json_schema_extra=cloud(DEPLOYED))
    alert_webhook_url: SecretStr | None = Field(default=None, json_schema_extra=cloud(DEFAULT))
    # What alerts when a pipeline's file does not say (comma-separated).
    alert_events: str = Field(default="batch_failed,deadline_missed,deadline_warning,file_late",
                              json_schema_extra=cloud(DEPLOYED))

    @field_validator("buckets", "datasets", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        # An empty variable means "no mapping", not a JSON error.
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON object of names: {exc.msg}") from exc
        return value

    @field_validator("buckets")
    @classmethod
    def _bucket_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in (*value, *value.values()):
            if not _BUCKET_RE.match(name):
                raise ValueError(f"{name!r} is not a valid bucket name")
        # A finalized object's real bucket must lead back to exactly one logical name.
        seen: dict[str, str] = {}
        for logical, real in value.items():
            if real in seen:
                raise ValueError(f"{seen[real]!r} and {logical!r} both map to bucket {real!r}")
            seen[real] = logical
        return value

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in (*value, *value.values()):
            if not _DATASET_RE.match(name):
                raise ValueError(f"{name!r} is not a valid dataset name")
        return value

    def for_cloud(self) -> Settings:
        """These settings with the cloud's value wherever one is fixed and the environment
        left the local default (a function without ORCHESTRATOR_OBJECT_STORE lists GCS,
        not an empty local folder)."""
        fixed = {name: need for name, field in type(self).model_fields.items()
                 if (need := cloud_need(field)) not in (None, DEPLOYED, DEFAULT, LOCAL)
                 and name not in self.model_fields_set}
        return self.model_copy(update=fixed)

    def resolved_database_url(self) -> str:
        if self.database_url is None:
            return f"sqlite:///{(self.home / 'metadata.db').resolve().as_posix()}"
        url = self.database_url
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this package ships psycopg2.
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg2://" + url.split("://", 1)[1]
        if self.db_password:
            from sqlalchemy.engine import make_url

            return make_url(url).set(password=self.db_password).render_as_string(
                hide_password=False
            )
        return url


def environment_name(settings_class: type[BaseSettings], field_name: str) -> str:
    """The environment variable a setting is read from (its alias, or prefix + NAME)."""
    field = settings_class.model_fields[field_name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return str(first)
    if isinstance(alias, str):
        return alias
    prefix = settings_class.model_config.get("env_prefix") or ""
    return f"{prefix}{field_name}".upper()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
