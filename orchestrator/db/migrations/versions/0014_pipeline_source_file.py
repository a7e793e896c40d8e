"""A pipeline remembers the file it was last synced from.

Two files that name the same pipeline would otherwise replace each other's
definition in turn; a sync from a file other than the stored one is refused unless
asked for. Pipelines synced before this (or built in code) have no file.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pipelines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_file", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pipelines", schema=None) as batch_op:
        batch_op.drop_column("source_file")
