"""Settings from the environment only (`ORCHESTRATOR_*`, `DATABASE_URL`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

HOME_DIR = Path(".orchestrator")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore")

    home: Path = Field(default=HOME_DIR, description="Folder of the embedded runtime's state.")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "ORCHESTRATOR_DATABASE_URL"),
        description="SQLAlchemy URL; default: a SQLite file under `home`.",
    )
    # Kept out of DATABASE_URL so that it can be mounted from Secret Manager.
    db_password: str | None = None
    db_pool_size: int = 2
    db_max_overflow: int = 0
    db_pool_timeout_s: float = 10.0

    gcp_project: str | None = None
    tasks_topic: str = "tasks"
    events_topic: str = "batch-events"
    pipelines_dir: Path = Path("pipelines")
    warehouse: str = "local"  # "local" (DuckDB) or "bigquery"
    bq_dataset: str | None = None
    bq_location: str | None = None
    # `table$YYYYMM` partition decorators; bqemulator has none (partitions emptied by DELETE).
    bq_partition_decorators: bool = True
    object_store: str = "local"  # "local" (a folder of buckets) or "gcs"
    log_format: str = "text"  # "text" locally, "json" for Cloud Logging

    # Sweeper: a QUEUED task nobody claimed within this grace is published again.
    redispatch_after_s: float = 60.0
    # Cap on RUNNING attempts of a task that sets no `concurrency` (None: unlimited).
    default_concurrency: int | None = Field(default=None, ge=1)
    workers: int = 4
    # A worker that finishes a task runs one of the children it just queued itself,
    # for up to this long per delivery (0 turns it off): no publish, no second hop.
    continuation_s: float = 30.0

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
