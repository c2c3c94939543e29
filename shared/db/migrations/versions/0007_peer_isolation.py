"""peers.isolation: what a spoke says it gives its agents (full, namespaces, none)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:00:00

Plain ALTER TABLE on both dialects: a batch rebuild of peers on SQLite would drop the
security-epoch triggers of 0006 with the old table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('peers', sa.Column('isolation', sa.String(length=16), nullable=False,
                                     server_default=''))


def downgrade() -> None:
    # SQLite (3.35 and later) drops a column in place, keeping the table's triggers.
    op.execute("ALTER TABLE peers DROP COLUMN isolation")
