"""Alembic environment: the URL comes from the caller or the settings, never a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from orchestrator.db.models import Base
from orchestrator.db.session import make_engine
from orchestrator.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # The engine the orchestrator itself uses: on SQLite its transactions cover DDL too.
    engine = make_engine(_url(), pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _configure(connection: Connection) -> None:
    # Batch mode lets later migrations ALTER tables on SQLite too.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)


def _run(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        _run_on_sqlite(connection)
        return
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def _run_on_sqlite(connection: Connection) -> None:
    """All the migrations in one transaction, with foreign keys off.

    Batch mode changes a table SQLite cannot alter in place by building a copy,
    dropping the original and renaming the copy into place. With foreign keys on,
    dropping a table others reference (pipelines, tasks, batches) deletes their rows
    through ON DELETE CASCADE. SQLite only switches foreign keys off outside a
    transaction, so it is done here, before the transaction begins; before it
    commits, every reference must still find its row."""
    if connection.in_transaction():
        raise RuntimeError("SQLite migrations need a connection outside a transaction: "
                           "they switch foreign keys off first, which SQLite ignores "
                           "inside one")
    raw = connection.connection.driver_connection
    assert raw is not None
    foreign_keys = raw.execute("PRAGMA foreign_keys").fetchone()[0]
    raw.execute("PRAGMA foreign_keys = OFF")
    # SQLite refuses to rename a rebuilt table into place while a view
    # (batch_task_status) names the table that is missing for the moment, unless
    # renames follow the legacy rule.
    raw.execute("PRAGMA legacy_alter_table = ON")
    try:
        with connection.begin():
            _configure(connection)
            context.run_migrations()
            _check_foreign_keys(connection)
    finally:
        raw.execute("PRAGMA legacy_alter_table = OFF")
        raw.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")


def _check_foreign_keys(connection: Connection) -> None:
    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if dangling:
        shown = ", ".join(f"{table} row {rowid} (to {parent})"
                          for table, rowid, parent, _fk in dangling[:5])
        raise RuntimeError(f"the migration would leave {len(dangling)} row(s) referring "
                           f"to rows that do not exist: {shown}; nothing was changed")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
