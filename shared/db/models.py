"""Tables of one instance's state.db. Hub and spoke share one schema; each uses its part.

Times are integer Unix milliseconds; nothing dialect-specific, so the same models run on
SQLite and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A grant over a whole tenant stores this instead of NULL: two NULLs never collide in a
# unique constraint, and a duplicate whole-tenant grant must.
ALL_WORKSPACES = "*"


class Base(DeclarativeBase):
    pass


class Peer(Base):
    __tablename__ = "peers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    address: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    # On a hub: when this spoke's last heartbeat arrived.
    last_heartbeat_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The peer's TLS certificate (PEM), pinned: the only one accepted for it.
    tls_cert: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # On a hub: what this spoke says it gives its agents (full, namespaces, none, or
    # unavailable), from its heartbeats.
    isolation: Mapped[str] = mapped_column(String(16), default="", server_default="")


class PeerKey(Base):
    __tablename__ = "peer_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[int] = mapped_column(ForeignKey("peers.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    state: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    # Set when the peer rotated away from this key: accepted until then, never after.
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class Workspace(Base):
    __tablename__ = "workspaces"
    __table_args__ = (UniqueConstraint("tenant_id", "slug"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    slug: Mapped[str] = mapped_column(String(63))
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    # Most agents that may run at once in this workspace; None: no workspace limit.
    max_agents: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SeenMessage(Base):
    """Replay memory: every accepted message id, its hash, and the signed answer."""

    __tablename__ = "seen_messages"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    envelope_sha256: Mapped[str] = mapped_column(String(64))
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    received_at_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    # The process (MessageMemory) handling it while response is NULL; several processes
    # may share a PostgreSQL database.
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Grant(Base):
    """On a spoke: a hub may act in a tenant (or one workspace of it) up to max_role."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("peer_id", "tenant_id", "workspace"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[int] = mapped_column(ForeignKey("peers.id", ondelete="CASCADE"))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    workspace: Mapped[str] = mapped_column(String(63), default=ALL_WORKSPACES)
    max_role: Mapped[int] = mapped_column(Integer)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class Agent(Base):
    """On a spoke: an agent process and its lifecycle."""

    __tablename__ = "agents"
    __table_args__ = (Index("ix_agents_scope", "tenant", "workspace"),)
    agent_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(63))
    workspace: Mapped[str] = mapped_column(String(63))
    template: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(Text, default="")
    principal: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # /proc/PID/stat field 22: with the pid, what tells this process from a recycled pid.
    pid_start_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    workdir: Mapped[str] = mapped_column(Text)
    log_path: Mapped[str] = mapped_column(Text)
    grace_ms: Mapped[int] = mapped_column(Integer)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    started_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ended_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # How many state changes were reported for this agent (the outbox's last seq).
    report_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class OutboxEntry(Base):
    """On a spoke: a state change waiting to be reported to the hub that spawned it.
    Written in the same transaction as the change; deleted once the hub acknowledged."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("agent_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hub: Mapped[str] = mapped_column(String(64), index=True)
    agent_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)
    # The agent as a serialized wire Agent message, as of this change.
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class OperatorToken(Base):
    """On a hub: an operator bearer token, stored as its SHA-256 only."""

    __tablename__ = "operator_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    principal: Mapped[str] = mapped_column(String(64))
    role: Mapped[int] = mapped_column(Integer)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Set when the token was rotated out: it works until then, never after.
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The token that replaced this one; 0 while a rotation is claiming it.
    replaced_by_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class HubAgent(Base):
    """On a hub: every agent it spawned, where, and the last state it heard."""

    __tablename__ = "hub_agents"
    __table_args__ = (Index("ix_hub_agents_scope", "tenant", "workspace"),)
    agent_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    spoke: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(63))
    workspace: Mapped[str] = mapped_column(String(63))
    template: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    spawn_message_id: Mapped[str] = mapped_column(String(64))
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)
    # The latest serialized wire Agent the spoke reported, and its seq.
    snapshot: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    report_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reported_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class IdempotencyKey(Base):
    """On a hub: an operator call made with an idempotency key, and how it ended, so the
    same call again gets the same answer (hub/idempotency.py)."""

    __tablename__ = "idempotency_keys"
    tenant: Mapped[str] = mapped_column(String(63), primary_key=True)
    principal: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    method: Mapped[str] = mapped_column(String(64))
    request_sha256: Mapped[str] = mapped_column(String(64))
    # RUNNING, then DONE (response holds the answer) or REFUSED (error_code, message).
    state: Mapped[str] = mapped_column(String(16))
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error_code: Mapped[str] = mapped_column(String(32), default="", server_default="")
    error_message: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at_ms: Mapped[int] = mapped_column(BigInteger, index=True)


class AuditRecord(Base):
    """One link of the hash-chained audit trail (see shared/audit.py)."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    workspace: Mapped[str] = mapped_column(String(63))
    principal: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    message_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    # Unique: two appends racing on the same tail cannot both land.
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64))


class JoinToken(Base):
    """A hub's single-use invitation for one spoke name (only its hash is kept)."""

    __tablename__ = "join_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    pending: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int] = mapped_column(BigInteger)
    used_at_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class KeyRotation(Base):
    """This instance moved from one signing key to another; the old key stays valid at
    peers until grace_until_ms."""

    __tablename__ = "key_rotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    old_key_id: Mapped[str] = mapped_column(String(16))
    new_key_id: Mapped[str] = mapped_column(String(16), unique=True)
    new_public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    grace_until_ms: Mapped[int] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class KeyAnnouncement(Base):
    """Which peer has acknowledged which rotation (absent: still to be told)."""

    __tablename__ = "key_announcements"
    __table_args__ = (UniqueConstraint("rotation_id", "peer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rotation_id: Mapped[int] = mapped_column(ForeignKey("key_rotations.id",
                                                        ondelete="CASCADE"))
    peer: Mapped[str] = mapped_column(String(64))
    acked_at_ms: Mapped[int] = mapped_column(BigInteger)


class SecurityEpoch(Base):
    """One row whose value database triggers raise in every transaction that changes
    what a message is checked against (peers' names, states and TLS certificates, peer
    keys, tenants, workspaces, grants, operator tokens), whoever writes it. A daemon
    keeps what it read of those tables while this value stands (shared/security_view.py).
    """

    __tablename__ = "security_epoch"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger)
