"""peer states and tls certs, key expiry, join tokens, key rotations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 00:43:29.788154
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('join_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('pending', sa.Boolean(), nullable=False),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('used_at_ms', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_sha256')
    )
    op.create_table('key_rotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('old_key_id', sa.String(length=16), nullable=False),
    sa.Column('new_key_id', sa.String(length=16), nullable=False),
    sa.Column('new_public_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('grace_until_ms', sa.BigInteger(), nullable=False),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('new_key_id')
    )
    op.create_table('key_announcements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('rotation_id', sa.Integer(), nullable=False),
    sa.Column('peer', sa.String(length=64), nullable=False),
    sa.Column('acked_at_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['rotation_id'], ['key_rotations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('rotation_id', 'peer')
    )
    with op.batch_alter_table('peer_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at_ms', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('peers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tls_cert', sa.LargeBinary(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('peers', schema=None) as batch_op:
        batch_op.drop_column('tls_cert')

    with op.batch_alter_table('peer_keys', schema=None) as batch_op:
        batch_op.drop_column('expires_at_ms')

    op.drop_table('key_announcements')
    op.drop_table('key_rotations')
    op.drop_table('join_tokens')
