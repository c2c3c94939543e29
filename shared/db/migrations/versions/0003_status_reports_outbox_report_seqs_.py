"""status reports: outbox, report seqs, heartbeats

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 22:47:33.923236
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('outbox',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('hub', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('agent_id', 'seq')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_hub'), ['hub'], unique=False)

    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('report_seq', sa.Integer(), server_default='0', nullable=False))

    with op.batch_alter_table('hub_agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('snapshot', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('report_seq', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('reported_at_ms', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('peers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_heartbeat_ms', sa.BigInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('peers', schema=None) as batch_op:
        batch_op.drop_column('last_heartbeat_ms')

    with op.batch_alter_table('hub_agents', schema=None) as batch_op:
        batch_op.drop_column('reported_at_ms')
        batch_op.drop_column('report_seq')
        batch_op.drop_column('snapshot')

    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_column('report_seq')

    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_hub'))

    op.drop_table('outbox')
