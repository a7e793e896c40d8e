"""Apply the alembic migrations programmatically (`orchestrator db upgrade`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

# Shipped inside the package, so any installed copy can migrate from any directory.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    if not MIGRATIONS_DIR.is_dir():
        raise RuntimeError(f"migrations folder not found at {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    _migrate(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    _migrate(engine, command.downgrade, revision)


def _migrate(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    # The connection is handed over outside a transaction: env.py begins it (on
    # SQLite after switching foreign keys off, which only works outside one).
    cfg = alembic_config()
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        step(cfg, revision)


def head_revision() -> str:
    """The newest migration this package ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def current_revision(conn: Connection) -> str | None:
    """The database's migration (None if it was never migrated)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def schema_problem(engine: Engine, label: str) -> str | None:
    """Why the database cannot serve this version (None if its schema is the newest):
    never migrated, behind, or migrated by a newer version."""
    with engine.connect() as conn:
        current = current_revision(conn)
    head = head_revision()
    if current == head:
        return None
    if current is None:
        return (f"the database {label} has no orchestrator tables yet: run `orchestrator db "
                "upgrade` (`orchestrator pipelines sync` and `orchestrator deploy` migrate it "
                "too)")
    if current not in known_revisions():
        return (f"the database {label} was migrated by a newer orchestrator (schema "
                f"{current}; this one knows up to {head}): upgrade this installation")
    return (f"the database {label} has an older schema ({current}; this version needs "
            f"{head}): run `orchestrator db upgrade`")
