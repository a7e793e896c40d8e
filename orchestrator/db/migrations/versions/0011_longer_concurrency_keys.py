"""Concurrency keys fit the longest names.

`task:<pipeline>.<task>` with two 128-character names is 262 characters; the
200-character key made such a limited task impossible to claim.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("concurrency_locks", schema=None) as batch_op:
        batch_op.alter_column("key", existing_type=sa.String(length=200),
                              type_=sa.String(length=300), existing_nullable=False)


def downgrade() -> None:
    op.execute("DELETE FROM concurrency_locks WHERE length(key) > 200")
    with op.batch_alter_table("concurrency_locks", schema=None) as batch_op:
        batch_op.alter_column("key", existing_type=sa.String(length=300),
                              type_=sa.String(length=200), existing_nullable=False)
