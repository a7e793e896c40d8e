"""The few dialect-specific statements, behind one helper each."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(session: Session, table: Any, index_elements: list[str]) -> Any:
    """INSERT … ON CONFLICT (cols) DO NOTHING, for Postgres and SQLite alike."""
    name = session.get_bind().dialect.name
    mod = postgresql if name == "postgresql" else sqlite
    return mod.insert(table).on_conflict_do_nothing(index_elements=index_elements)


def lock_skip_locked(session: Session, stmt: Any) -> Any:
    """FOR NO KEY UPDATE SKIP LOCKED where the database has row locks. SQLite takes the
    whole database for a writer (BEGIN IMMEDIATE), which gives the same guarantee.

    NO KEY UPDATE keeps every other writer out, yet lets an insert that references the
    row check its foreign key (FOR KEY SHARE): with FOR UPDATE, a batch row locked here
    would stall every event its workers write, and deadlock with whichever of them
    holds a task row the locker then waits for."""
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True, key_share=True)
    return stmt


def upsert(session: Session, table: Any, index_elements: list[str], values: dict[str, Any],
           update: list[str], where: Any = None) -> Any:
    """INSERT … ON CONFLICT (cols) DO UPDATE SET the `update` columns [WHERE …], on both
    stores."""
    name = session.get_bind().dialect.name
    mod = postgresql if name == "postgresql" else sqlite
    stmt = mod.insert(table).values(**values)
    return stmt.on_conflict_do_update(index_elements=index_elements,
                                      set_={c: stmt.excluded[c] for c in update}, where=where)
