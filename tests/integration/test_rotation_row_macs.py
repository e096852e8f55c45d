"""Rotation rows carry a MAC over their identity: a database writer who moves an
interrupted rotation to another cluster, scope or host cannot make recovery fetch the new
key and store it or send it elsewhere (SQLite and PostgreSQL, local transport, emulated
ta-tool, real HTTP receivers standing in for both clusters' Open API)."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text

from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.errors import InvalidInput, NotFound, RowIntegrityError
from keyvault.models import Host, Rotation
from keyvault.sandbox import state
from keyvault.scope import root_scope
from keyvault.services import clusters, integrity, secrets
from keyvault.services.rotation import RotationService
from keyvault.services.store import open_keyring
from tests.support.cluster import add_emulated_cluster, install_ta_tool, local_connector
from tests.support.http import CountingReceiver


class Crash(Exception):
    """Raised by the on_step hook: the rotating process "dies" after ta-tool ran."""


@pytest.fixture
def world(tmp_path, cli):
    """Cluster `c` (prod) and `dev`, each with a host and an Open API receiver that counts."""
    assert cli("init").exit_code == 0
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    prod_ta = install_ta_tool(tmp_path / "ta-c", ["app1"])
    receivers = {"c": CountingReceiver(), "dev": CountingReceiver()}
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", prod_ta, host="ta-a")
        add_emulated_cluster(s, "dev", install_ta_tool(tmp_path / "ta-dev", []), host="ta-dev")
        keyring = open_keyring(s, settings=settings)
        for name, receiver in receivers.items():
            clusters.set_options(s, keyring=keyring, name=name, open_api_url=receiver.url)
    yield {
        "settings": settings,
        "factory": factory,
        "engine": engine,
        "state": prod_ta.state_dir,
        "connector": local_connector(tmp_path / "ta-home"),
        "ta_home": tmp_path / "ta-home",
        "receivers": receivers,
    }
    for receiver in receivers.values():
        receiver.close()
    engine.dispose()


def service(world, **kwargs) -> RotationService:
    return RotationService(
        world["factory"], settings=world["settings"], connector=world["connector"], **kwargs
    )


def interrupted(world) -> str:
    """A root rotation of `c` that "died" after ta-tool generated its key."""

    def crash(step, rid):
        if step == "generated":
            raise Crash(rid)

    with pytest.raises(Crash) as info:
        service(world, on_step=crash).rotate("c", root_scope(), actor="t")
    return str(info.value)


def pending(world) -> list[str]:
    d = world["ta_home"] / ".keyvault" / "pending"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def sql(world, statement: str, **params) -> None:
    with world["engine"].begin() as conn:
        conn.execute(text(statement), params)


def ids(world) -> dict[str, int]:
    """Cluster ids by name and host ids by address."""
    with transaction(world["factory"]) as s:
        out = {r.name: r.id for r in s.execute(text("SELECT id, name FROM clusters"))}
        out |= {h.address: h.id for h in s.scalars(select(Host))}
    return out


def sent(world) -> dict[str, int]:
    return {name: r.requests for name, r in world["receivers"].items()}


def stored_root(world, cluster: str) -> str | None:
    with transaction(world["factory"]) as s:
        try:
            version = secrets.get_version(s, cluster_name=cluster, scope=root_scope())
        except NotFound:
            return None
        return secrets.reveal(open_keyring(s, settings=world["settings"]), version)


def assert_refused_and_kept(world, rid: str) -> None:
    """Recovery and abandon refuse naming the rotation; nothing fetched, sent or deleted."""
    before = pending(world)
    assert f"{rid}.out" in before
    with pytest.raises(RowIntegrityError) as info:
        service(world).recover(rid, actor="t")
    assert rid in str(info.value) and "pending" in info.value.hint
    with pytest.raises(RowIntegrityError):
        service(world).abandon(rid, reason="regenerate")
    assert sent(world) == {"c": 0, "dev": 0}
    assert pending(world) == before
    assert stored_root(world, "c") is None and stored_root(world, "dev") is None
    with transaction(world["factory"]) as s:
        assert s.get(Rotation, rid).state == "pending"


def assert_recovers(world, rid: str) -> None:
    outcome = service(world).recover(rid, actor="t")
    assert outcome.state == "completed" and outcome.cleaned_up
    assert stored_root(world, "c") == state.current_key(world["state"], "root")
    assert sent(world) == {"c": 1, "dev": 0}  # the check went to c's Open API only


@pytest.mark.parametrize(
    ("column", "value"),
    [("cluster_id", "dev"), ("scope", "app:app1"), ("host_id", "ta-dev")],
)
def test_a_moved_rotation_row_is_refused_until_put_back(world, column, value):
    rid = interrupted(world)
    original = ids(world)["c" if column == "cluster_id" else "ta-a"]
    new = ids(world).get(value, value)
    sql(world, f"UPDATE rotations SET {column} = :v WHERE id = :rid", v=new, rid=rid)
    assert_refused_and_kept(world, rid)
    # The operator puts the row back (from a backup): the key was never lost.
    put_back = original if column != "scope" else "root"
    sql(world, f"UPDATE rotations SET {column} = :v WHERE id = :rid", v=put_back, rid=rid)
    assert_recovers(world, rid)


def test_a_host_of_another_cluster_is_refused_even_under_a_valid_row_mac(world):
    """Defence in depth: a rotation row that names another cluster's host is never used,
    even if its MAC verifies (the host's own MAC covers its cluster)."""
    rid, dev_host = interrupted(world), ids(world)["ta-dev"]
    with transaction(world["factory"]) as s:
        row = s.get(Rotation, rid)
        row.host_id = dev_host
        integrity.seal_row(s, row, keyring=open_keyring(s, settings=world["settings"]))
    with pytest.raises(RowIntegrityError) as info:
        service(world).recover(rid, actor="t")
    assert "another cluster" in str(info.value)
    assert sent(world) == {"c": 0, "dev": 0} and f"{rid}.out" in pending(world)


def test_a_row_stripped_of_its_mac_is_refused_and_never_adopted(world, cli):
    """Adoption is only for rows an upgrade to row MACs found (migration 0012): a MAC a
    writer removed later is never put back by `db adopt`; the key stays on the TA host."""
    rid = interrupted(world)
    sql(world, "UPDATE rotations SET mac = NULL, mac_key_id = NULL WHERE id = :rid", rid=rid)
    assert_refused_and_kept(world, rid)
    refused = cli("db", "adopt", "--yes")
    assert refused.exit_code != 0 and "adopted already" in refused.stderr
    assert_refused_and_kept(world, rid)


def test_master_key_rotate_between_interruption_and_recovery(world, cli):
    rid = interrupted(world)
    assert cli("master-key", "rotate", "--yes").exit_code == 0
    with transaction(world["factory"]) as s:
        row = s.get(Rotation, rid)
        live = open_keyring(s, settings=world["settings"]).active
        assert (
            row.mac_key_id == live
            and integrity.failure(row, keyring=open_keyring(s, settings=world["settings"])) is None
        )
    assert_recovers(world, rid)


def test_a_resolved_rotation_whose_host_was_removed_still_verifies(world, cli):
    rid = interrupted(world)
    assert_recovers(world, rid)
    assert cli("host", "remove", "c", "ta-a", "--yes").exit_code == 0
    with transaction(world["factory"]) as s:
        keyring = open_keyring(s, settings=world["settings"])
        assert integrity.problems(s, keyring=keyring) == []
    again = service(world).recover(rid, actor="t")
    assert "nothing to do" in " ".join(again.warnings)
    with pytest.raises(InvalidInput):
        service(world).abandon(rid, reason="x")
