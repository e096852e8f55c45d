"""`keyvault webhook add` / `webhook deliver` refuse receivers on loopback, link-local, private
and metadata addresses unless `--allow-private-network` (KEYVAULT_ALLOW_PRIVATE_NETWORK=1).

The choice belongs to each process and is not stored with the webhook: a URL added with the
flag is still refused by a delivering process that was not given it.
"""

from __future__ import annotations

import json

import pytest

from tests.support.cli import Cli, expect, one_error_line
from tests.support.http import CountingReceiver
from tests.support.leak_guard import new_key

CLUSTER = "c"


@pytest.fixture
def store(cli: Cli) -> Cli:
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"))
    return cli


def _hooks(store: Cli) -> list[dict]:
    return json.loads(expect(store("webhook", "list", "--json")).stdout)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("http://[::1]:8080/hook", "::1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://2130706433/hook", "127.0.0.1"),
        ("http://0/hook", "0.0.0.0"),
        ("http://localhost/hook", "127.0.0.1"),
    ],
    ids=["loopback", "ipv6-loopback", "metadata", "decimal", "zero", "localhost"],
)
def test_add_refuses_private_destinations_unless_allowed(store: Cli, url: str, address: str):
    refused = store("webhook", "add", url, "--scope", f"root:{CLUSTER}")
    one_error_line(refused, 2, address, "--allow-private-network")
    assert _hooks(store) == []  # nothing half-written

    expect(store("webhook", "add", "--allow-private-network", url, "--scope", f"root:{CLUSTER}"))
    assert [h["url"] for h in _hooks(store)] == [url]


def test_add_takes_the_choice_from_the_environment(store: Cli, monkeypatch):
    monkeypatch.setenv("KEYVAULT_ALLOW_PRIVATE_NETWORK", "1")
    expect(store("webhook", "add", "http://127.0.0.1:9/hook", "--scope", f"root:{CLUSTER}"))
    monkeypatch.setenv("KEYVAULT_ALLOW_PRIVATE_NETWORK", "0")
    refused = store("webhook", "add", "http://127.0.0.1:9/other", "--scope", f"root:{CLUSTER}")
    one_error_line(refused, 2, "127.0.0.1", "--allow-private-network")
    assert len(_hooks(store)) == 1


def _import_root(store: Cli) -> None:
    expect(store("import", "--cluster", CLUSTER, "--root", input=new_key() + "\n"))


def test_delivery_is_refused_unless_the_delivering_process_allows_it(
    store: Cli, receiver: CountingReceiver
):
    # Added by a process that allowed private networks ...
    add = ("webhook", "add", "--allow-private-network", receiver.url, "--scope", f"root:{CLUSTER}")
    expect(store(*add))
    _import_root(store)

    # ... a deliverer without the flag records a failed attempt and sends nothing.
    done = json.loads(expect(store("webhook", "deliver", "--json")).stdout)
    assert (done["attempted"], done["delivered"], done["retrying"]) == (1, 0, 1)
    assert receiver.requests == 0
    (failed,) = json.loads(expect(store("webhook", "deliveries", "--failed", "--json")).stdout)
    assert failed["status"] == "pending" and failed["attempts"] == 1
    assert failed["last_status"] is None
    assert "127.0.0.1" in failed["last_error"] and "refused" in failed["last_error"]

    # A deliverer given the flag sends: the new event now, the refused one once its (jittered)
    # backoff is due, which may already be the case.
    _import_root(store)
    done = json.loads(
        expect(store("webhook", "deliver", "--allow-private-network", "--json")).stdout
    )
    assert done["delivered"] >= 1 and receiver.requests == done["delivered"]
    rows = json.loads(expect(store("webhook", "deliveries", "--json")).stdout)
    newest = max(rows, key=lambda r: r["id"])
    assert newest["status"] == "delivered" and newest["attempts"] == 1
