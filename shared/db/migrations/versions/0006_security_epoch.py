"""security_epoch: a change counter the database raises with every security change

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 12:00:00

Triggers raise security_epoch.value in the transaction of any change to the tables a
message is checked against, so that daemons can keep what they read of them until it
changes, and a change made anywhere (the CLI in another process, another hub sharing a
PostgreSQL database, a SQL shell) acts on the next message all the same.

A later migration that rebuilds one of these tables (SQLite's batch mode copies it to a
new table and drops the old one, and its triggers with it) must create its triggers
again: tests/unit/test_security_view.py checks that every watched table has them at head.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each watched table, and the columns whose change matters (None: every column). A
# peer's address and last heartbeat change often and are not checked against.
WATCHED: dict[str, tuple[str, ...] | None] = {
    'peers': ('name', 'state', 'tls_cert'),
    'peer_keys': None,
    'tenants': None,
    'workspaces': None,
    'grants': None,
    'operator_tokens': None,
}


def upgrade() -> None:
    op.create_table(
        'security_epoch',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('value', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.execute("INSERT INTO security_epoch (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(
            "CREATE FUNCTION fleetwire_security_epoch_raise() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "UPDATE security_epoch SET value = value + 1 WHERE id = 1; RETURN NULL; "
            "END $$")
        for table, columns in WATCHED.items():
            of = f" OF {', '.join(columns)}" if columns else ""
            op.execute(
                f"CREATE TRIGGER security_epoch_{table} "
                f"AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE{of} ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION fleetwire_security_epoch_raise()")
        return
    for table, columns in WATCHED.items():
        of = f" OF {', '.join(columns)}" if columns else ""
        for event in ('INSERT', 'DELETE', f'UPDATE{of}'):
            op.execute(
                f"CREATE TRIGGER security_epoch_{table}_{event.split()[0].lower()} "
                f"AFTER {event} ON {table} "
                "BEGIN UPDATE security_epoch SET value = value + 1 WHERE id = 1; END")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    for table in WATCHED:
        if postgres:
            op.execute(f"DROP TRIGGER security_epoch_{table} ON {table}")
            continue
        for event in ('insert', 'delete', 'update'):
            op.execute(f"DROP TRIGGER security_epoch_{table}_{event}")
    if postgres:
        op.execute("DROP FUNCTION fleetwire_security_epoch_raise()")
    op.drop_table('security_epoch')
