"""The rotation journal on SQLite and PostgreSQL: every state write checks the one table."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from keyvault.config import load_settings
from keyvault.db import session_factory, transaction
from keyvault.errors import InvalidInput, RotationUnresolved
from keyvault.models import Cluster, Event, Host, Rotation, utcnow
from keyvault.rotation_states import IllegalTransition, RotationState
from keyvault.scope import app_scope
from keyvault.services.rotation.journal import Journal
from keyvault.services.store import open_keyring
from keyvault.services.verify import KeyCheckOutcome

S = RotationState


class _KeyedJournal(Journal):
    """The journal with the store's keyring (pending rows are MACed when created)."""

    def create_pending(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with transaction(self.factory) as s:
            keyring = open_keyring(s, settings=load_settings())
        return super().create_pending(*args, keyring=keyring, **kwargs)


@pytest.fixture
def journal(engine, cli):
    assert cli("init").exit_code == 0  # a keyring: pending rows are MACed
    factory = session_factory(engine)
    with transaction(factory) as s:
        # Cluster and host rows only: the journal does not check their MACs.
        now = utcnow()
        cluster = Cluster(
            name="c",
            open_api_url="http://127.0.0.1:9",
            key_pattern="x+",
            options="{}",
            created_at=now,
        )
        s.add(cluster)
        s.flush()
        host = Host(
            cluster_id=cluster.id,
            address="ta-a",
            port=22,
            username="ta",
            become="none",
            ta_user="ta",
            position=1,
            created_at=now,
        )
        s.add(host)
        s.flush()
        s.refresh(host)
    return _KeyedJournal(factory), cluster, host


def state(journal: Journal, rid: str) -> str:
    return journal.state_of(rid)


def test_one_unresolved_rotation_per_scope_and_the_refusal_names_it(journal):
    jour, cluster, host = journal
    assert jour.create_pending([("r1", app_scope("a1"))], cluster, host, "t") == {}
    refused = jour.create_pending(
        [("r2", app_scope("a1")), ("r3", app_scope("a2"))], cluster, host, "t"
    )
    assert list(refused) == ["r2"] and isinstance(refused["r2"], RotationUnresolved)
    assert refused["r2"].rotation_id == "r1" and state(jour, "r3") == "pending"


def test_verdicts_are_recorded_with_an_event_and_never_demote_a_resolved_rotation(journal):
    jour, cluster, host = journal
    jour.create_pending([("r1", app_scope("a1"))], cluster, host, "t")
    jour.mark("r1", S.NEEDS_RECOVERY, error="lost", event="rotation.failed")
    jour.mark("r1", S.NEEDS_RECOVERY, error="still lost", event=None)
    assert state(jour, "r1") == "needs_recovery"
    jour.abandon("r1", "regenerate")
    jour.mark("r1", S.FAILED, error="late verdict", event="rotation.failed")  # a no-op
    with transaction(jour.factory) as s:
        row = s.get(Rotation, "r1")
        assert (row.state, row.error) == ("abandoned", "regenerate")
        events = s.scalars(select(Event).where(Event.scope == "app:a1")).all()
        assert [e.type for e in events] == ["rotation.failed"]


def test_writes_outside_the_table_are_refused_and_leave_the_row_unchanged(journal):
    jour, cluster, host = journal
    jour.create_pending([("r1", app_scope("a1"))], cluster, host, "t")
    jour.mark("r1", S.FAILED, error="ta-tool failed", event=None)
    with pytest.raises(IllegalTransition) as info:
        jour.record_cleaned(["r1"])  # failed -> stored is not a transition
    assert "failed -> stored" in str(info.value)
    with pytest.raises(IllegalTransition):
        jour.record_verification("r1", KeyCheckOutcome("verified", 0, "ok"), "f" * 16)
    with pytest.raises(InvalidInput):
        jour.abandon("r1", "too late")
    with transaction(jour.factory) as s:
        row = s.get(Rotation, "r1")
        assert (row.state, row.cleaned_up, row.verify_state) == ("failed", False, None)
