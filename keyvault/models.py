"""SQLAlchemy models. The alembic migrations are the schema's only source;
these mirror them, and `keyvault db check` proves the two agree."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from keyvault.rotation_states import UNRESOLVED, RotationState

CURRENT = "current"
INVALIDATED = "invalidated"
# The unresolved states as stored strings, in the enum's order (for `IN (...)` queries).
UNRESOLVED_ROTATION_STATES: tuple[str, ...] = tuple(
    s.value for s in RotationState if s in UNRESOLVED
)


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores naive UTC, returns aware UTC: identical on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to UTCDateTime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class RowMac:
    """A row whose security-relevant columns carry a MAC (``services.integrity``).

    ``mac`` is HMAC-SHA256 under a key derived from master key ``mac_key_id``; both are
    NULL on rows a store upgraded to 0008 has not adopted yet (refused until it has).
    """

    mac: Mapped[str | None] = mapped_column(String(64))
    mac_key_id: Mapped[str | None] = mapped_column(String(64))


class MasterKey(Base):
    """A master key id known to this store, with a check value to detect a wrong key."""

    __tablename__ = "master_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    check_value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Cluster(RowMac, Base):
    """A TA cluster and how to reach its Open API."""

    __tablename__ = "clusters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    open_api_url: Mapped[str] = mapped_column(String(512), nullable=False)
    key_pattern: Mapped[str] = mapped_column(String(256), nullable=False)
    options: Mapped[str] = mapped_column(Text, nullable=False, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    secrets: Mapped[list[Secret]] = relationship(back_populates="cluster")


class Secret(Base):
    """One key scope of a cluster: ``root`` or ``app:<APPID>``."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("cluster_id", "scope", name="uq_secrets_cluster_scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), nullable=False)
    scope: Mapped[str] = mapped_column(String(80), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    cluster: Mapped[Cluster] = relationship(back_populates="secrets")
    versions: Mapped[list[SecretVersion]] = relationship(
        back_populates="secret",
        order_by="SecretVersion.number",
        foreign_keys="SecretVersion.secret_id",
    )


class SecretVersion(Base):
    """One generated or imported key, encrypted; changed only to record its invalidation."""

    __tablename__ = "secret_versions"
    __table_args__ = (
        UniqueConstraint("secret_id", "number", name="uq_secret_versions_number"),
        CheckConstraint("state IN ('current', 'invalidated')", name="ck_secret_versions_state"),
        CheckConstraint(
            "(state = 'current' AND invalidated_at IS NULL)"
            " OR (state = 'invalidated' AND invalidated_at IS NOT NULL)",
            name="ck_secret_versions_invalidated_at",
        ),
        CheckConstraint(
            "source IN ('import', 'rotation', 'restore')", name="ck_secret_versions_source"
        ),
        Index(
            "uq_secret_versions_one_current",
            "secret_id",
            unique=True,
            sqlite_where=text("state = 'current'"),
            postgresql_where=text("state = 'current'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_id: Mapped[int] = mapped_column(ForeignKey("secrets.id"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    master_key_id: Mapped[str] = mapped_column(ForeignKey("master_keys.id"), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(16), nullable=False)
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    created_by: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    invalidated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("secret_versions.id"))
    rotation_id: Mapped[str | None] = mapped_column(String(32))

    secret: Mapped[Secret] = relationship(back_populates="versions", foreign_keys=[secret_id])
    superseded_by: Mapped[SecretVersion | None] = relationship(remote_side=[id])

    def __repr__(self) -> str:
        return (
            f"SecretVersion(secret_id={self.secret_id}, number={self.number}, state={self.state!r})"
        )


class Event(Base):
    """The outbox: one row per change, written in the transaction that makes it."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    cluster: Mapped[str] = mapped_column(String(64), nullable=False)
    scope: Mapped[str] = mapped_column(String(80), nullable=False)
    payload: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class Host(RowMac, Base):
    """An SSH host of a cluster where ta-tool can be run."""

    __tablename__ = "hosts"
    __table_args__ = (
        UniqueConstraint("cluster_id", "address", "port", name="uq_hosts_address"),
        CheckConstraint("become IN ('su', 'sudo', 'none')", name="ck_hosts_become"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), nullable=False)
    address: Mapped[str] = mapped_column(String(255), nullable=False)
    port: Mapped[int] = mapped_column(Integer, nullable=False)
    username: Mapped[str] = mapped_column(String(64), nullable=False)
    identity_file: Mapped[str | None] = mapped_column(String(1024))
    become: Mapped[str] = mapped_column(String(8), nullable=False)
    ta_user: Mapped[str] = mapped_column(String(64), nullable=False)
    host_key_fingerprint: Mapped[str | None] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    # Joined: hosts outlive their session in the rotation service and name their cluster.
    cluster: Mapped[Cluster] = relationship(lazy="joined", innerjoin=True)

    @property
    def label(self) -> str:
        return f"{self.username}@{self.address}:{self.port}"


class Rotation(RowMac, Base):
    """The journal of one rotation, committed before ta-tool runs (see docs/rotation.md).

    Its MAC covers what it is created with and recovery steers the key by (id, cluster,
    scope, host, created_at); its state and outcome columns are not covered."""

    __tablename__ = "rotations"
    __table_args__ = (
        CheckConstraint(
            "state IN ('pending', 'needs_recovery', 'failed', 'stored', 'completed', 'abandoned')",
            name="ck_rotations_state",
        ),
        Index(
            "uq_rotations_one_unresolved",
            "cluster_id",
            "scope",
            unique=True,
            sqlite_where=text("state IN ('pending', 'needs_recovery')"),
            postgresql_where=text("state IN ('pending', 'needs_recovery')"),
        ),
        CheckConstraint(
            "old_key IS NULL OR old_key IN ('rejected', 'still_accepted', 'unchecked')",
            name="ck_rotations_old_key",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), nullable=False)
    scope: Mapped[str] = mapped_column(String(80), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"))
    host_label: Mapped[str] = mapped_column(String(400), nullable=False)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    old_version: Mapped[int | None] = mapped_column(Integer)
    new_version: Mapped[int | None] = mapped_column(Integer)
    new_fingerprint: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    cleaned_up: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    verify_state: Mapped[str | None] = mapped_column(String(16))
    verify_code: Mapped[int | None] = mapped_column(Integer)
    verify_message: Mapped[str | None] = mapped_column(Text)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Propagation (services/propagation.py): what TA said of the previous key after the
    # rotation, and when every known consumer held the new one.
    old_key: Mapped[str | None] = mapped_column(String(16))
    propagated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    cluster: Mapped[Cluster] = relationship(lazy="joined")
    host: Mapped[Host | None] = relationship(lazy="joined")


class Revision(Base):
    """One counter bumped by every change a key reader must see (versions, tokens).

    Servers compare it on each request to know whether their cache is fresh,
    so a read after a commit by any process returns the new key.
    """

    __tablename__ = "revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer, nullable=False)


class AccessToken(RowMac, Base):
    """A bearer token for the HTTP API; only its SHA-256 is stored, under a row MAC."""

    __tablename__ = "access_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    scopes: Mapped[str] = mapped_column(Text, nullable=False)
    can_rotate: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"AccessToken(name={self.name!r})"


class AuditRecord(Base):
    """One key read or rotation through the HTTP API, or one step of a CLI action.

    An HTTP record names its ``token_name``; a CLI record its ``actor`` (the OS user) and no
    token. A CLI action that reads a key or changes state writes two records: its intent
    (``phase`` "intent", outcome "pending"), committed before it acts, and its outcome
    (``phase`` "outcome", ``intent_id`` pointing back), after. An intent without an outcome
    is an action that was interrupted.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_at", "at"),
        Index("ix_audit_log_token", "token_name"),
        CheckConstraint(
            "phase IS NULL OR phase IN ('intent', 'outcome')", name="ck_audit_log_phase"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    token_name: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    cluster: Mapped[str | None] = mapped_column(String(64))
    scope: Mapped[str | None] = mapped_column(String(80))
    version: Mapped[int | None] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    actor: Mapped[str | None] = mapped_column(String(128))
    target: Mapped[str | None] = mapped_column(String(255))
    phase: Mapped[str | None] = mapped_column(String(8))
    intent_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    # The hash chain (``services.audit_chain``): the chain key that MACed this record and
    # the MAC over its content and the previous record's MAC. NULL: written before the chain.
    chain_key_id: Mapped[str | None] = mapped_column(String(32))
    chain_mac: Mapped[str | None] = mapped_column(String(64))


class AuditChainKey(Base):
    """A random key that MACs audit records, sealed under a master key like a key version.

    Sealed, not derived from the master key: records stay verifiable after the master key
    that was live when they were written is retired and gone from the keyring file (it is
    re-wrapped by `master-key rotate`, which also starts a new one). No foreign key to
    ``master_keys``: a restore replaces those rows and re-wraps these (see backup.merge).
    """

    __tablename__ = "audit_chain_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    master_key_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class AuditChainHead(Base):
    """The one row (id 1) every audit append locks: the chain's last record and MAC, the
    chain key new records use, and the anchor verification starts from.

    Records with ids up to ``anchor_id`` are not verified: written before the chain began
    (migration 0007) or pruned; the first record after it links to ``anchor_mac`` ("" for
    the start of the chain).
    """

    __tablename__ = "audit_chain"
    __table_args__ = (CheckConstraint("id = 1", name="ck_audit_chain_one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(Integer, nullable=False)
    last_mac: Mapped[str] = mapped_column(String(64), nullable=False)
    key_id: Mapped[str | None] = mapped_column(String(32))
    anchor_id: Mapped[int] = mapped_column(Integer, nullable=False)
    anchor_mac: Mapped[str] = mapped_column(String(64), nullable=False)


class Webhook(RowMac, Base):
    """A consumer endpoint notified of events in its scopes; its signing secret is sealed."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(1024), nullable=False)
    scopes: Mapped[str] = mapped_column(Text, nullable=False)
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    secret_wrapped_key: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    master_key_id: Mapped[str] = mapped_column(ForeignKey("master_keys.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One event owed to one webhook: delivered at least once, or dead-lettered."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_event"),
        CheckConstraint(
            "status IN ('pending', 'delivered', 'dead')", name="ck_webhook_deliveries_status"
        ),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id"), nullable=False)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The webhook lease holder that claimed it for an attempt not yet recorded (NULL: none,
    # or `webhook deliver`); a holder that takes the lease over makes such rows due again.
    claimed_by: Mapped[str | None] = mapped_column(String(200))


class RotationPolicy(RowMac, Base):
    """How old a key may get before `rotate due` rotates it, and when it may."""

    __tablename__ = "rotation_policies"
    __table_args__ = (UniqueConstraint("cluster_id", "target", name="uq_rotation_policies_target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), nullable=False)
    target: Mapped[str] = mapped_column(String(80), nullable=False)  # root, app:<APPID> or all-apps
    max_age_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    window: Mapped[str | None] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)

    cluster: Mapped[Cluster] = relationship(lazy="joined", innerjoin=True)


class ScopeSchedule(RowMac, Base):
    """Scheduler bookkeeping per scope: consecutive failures, backoff, pause."""

    __tablename__ = "scope_schedules"
    __table_args__ = (UniqueConstraint("cluster_id", "scope", name="uq_scope_schedules_scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"), nullable=False)
    scope: Mapped[str] = mapped_column(String(80), nullable=False)
    consecutive_failures: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


# The scheduler's lease (`rotate due`, timers, `serve --scheduler`); migration 0004 seeds it.
ROTATE_DUE_LEASE = "rotate-due"
WEBHOOK_LEASE = "webhook-deliveries"


class Lease(Base):
    """A named lease so that one runner acts at a time across processes and machines.

    The ``last_*`` columns are the end of the last run its holder finished (written in
    the statement that releases the lease, so a runner that lost the lease writes
    nothing); ``last_success_at`` and ``last_failure_at`` keep the last of each kind.
    One row per lease name: the record cannot grow.
    """

    __tablename__ = "leases"
    __table_args__ = (
        CheckConstraint(
            "last_outcome IN ('ok', 'partial', 'failed')", name="ck_leases_last_outcome"
        ),
    )

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acquired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # by this holder
    # +1 at every acquisition by a new holder (or after expiry): a fencing token.
    epoch: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_holder: Mapped[str | None] = mapped_column(String(200))
    last_outcome: Mapped[str | None] = mapped_column(String(16))  # ok, partial or failed
    last_rotated: Mapped[int | None] = mapped_column(Integer)
    last_failed: Mapped[int | None] = mapped_column(Integer)
    last_skipped: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)  # why the last failed run failed
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConsumerRead(Base):
    """The last version a consumer (token + the name it sends) read of a scope.

    Written by the HTTP servers' consumer tracker (http/consumer_tracker.py) as upserts,
    only when the version changes or the last write is a minute old, never per read.
    """

    __tablename__ = "consumer_reads"
    __table_args__ = (
        UniqueConstraint(
            "token_name", "consumer", "cluster", "scope", name="uq_consumer_reads_consumer"
        ),
        Index("ix_consumer_reads_scope", "cluster", "scope"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_name: Mapped[str] = mapped_column(String(64), nullable=False)
    consumer: Mapped[str] = mapped_column(String(64), nullable=False)
    cluster: Mapped[str] = mapped_column(String(64), nullable=False)
    scope: Mapped[str] = mapped_column(String(80), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    version_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    last_read_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class RowMacAdoption(Base):
    """Which rows of a MAC table may be adopted (trust on first use), written by migration 0012.

    ``row_ids`` (JSON list) are the rows that had no MAC when the store was upgraded; no other
    row is ever adoptable. ``closed_at`` is set once adoption has run (or when the migration
    found nothing to adopt): from then on no row of the store is adopted again.
    """

    __tablename__ = "row_mac_adoption"

    table_name: Mapped[str] = mapped_column(String(32), primary_key=True)
    row_ids: Mapped[str] = mapped_column(Text, nullable=False)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
