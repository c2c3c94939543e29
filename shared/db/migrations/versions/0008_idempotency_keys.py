"""idempotency_keys: operator calls made with an idempotency key, and their answers

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'idempotency_keys',
        sa.Column('tenant', sa.String(length=63), nullable=False),
        sa.Column('principal', sa.String(length=64), nullable=False),
        sa.Column('key', sa.String(length=128), nullable=False),
        sa.Column('method', sa.String(length=64), nullable=False),
        sa.Column('request_sha256', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('response', sa.LargeBinary(), nullable=True),
        sa.Column('error_code', sa.String(length=32), server_default='', nullable=False),
        sa.Column('error_message', sa.Text(), server_default='', nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('tenant', 'principal', 'key'),
    )
    op.create_index(op.f('ix_idempotency_keys_created_at_ms'), 'idempotency_keys',
                    ['created_at_ms'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_idempotency_keys_created_at_ms'), table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
