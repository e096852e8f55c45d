"""Webhook destinations: loopback, link-local, private and metadata addresses are refused
unless private networks are allowed, at add time (every resolved address) and at delivery
(the address actually connected to, against a real receiver on 127.0.0.1)."""

from __future__ import annotations

import pytest

from keyvault.errors import InvalidInput
from keyvault.httpclient import HttpError
from keyvault.services.webhooks import add_webhook, check_destination, http_send, is_public
from tests.support.http import CountingReceiver

PRIVATE_URLS = [
    "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
    "http://[::1]:8080/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one number
    "http://0/hook",  # 0.0.0.0
    "http://0x7f000001/hook",
    "http://127.1/hook",
    "http://localhost/hook",
    "http://10.0.0.8/hook",
    "http://192.168.1.10/hook",
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fd00:ec2::254]/hook",  # AWS metadata over IPv6 (unique local)
    "http://[fe80::1]/hook",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_destinations_are_refused_unless_allowed(url: str):
    with pytest.raises(InvalidInput, match="loopback, link-local, private or reserved"):
        check_destination(url, allow_private_network=False)
    check_destination(url, allow_private_network=True)  # the operator's explicit choice


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("8.8.8.8", True),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast
        ("255.255.255.255", False),
        ("not an address", False),
    ],
)
def test_is_public(address: str, public: bool):
    assert is_public(address) is public


def test_add_refuses_a_private_url_before_anything_is_written():
    # The check comes first: no session or keyring is touched (None would fail loudly).
    with pytest.raises(InvalidInput, match=r"169\.254\.169\.254"):
        add_webhook(
            None,  # type: ignore[arg-type]
            keyring=None,  # type: ignore[arg-type]
            url="http://169.254.169.254/hook",
            scopes=["root:c"],
            allow_private_network=False,
        )


def test_delivery_checks_the_address_it_connected_to(receiver: CountingReceiver):
    with pytest.raises(HttpError, match=r"is at 127\.0\.0\.1, a loopback.*refused"):
        http_send(receiver.url, b"{}", {}, allow_private_network=False)
    assert receiver.requests == 0  # refused before anything was sent
    assert http_send(receiver.url, b"{}", {}, allow_private_network=True) == 204
    assert receiver.requests == 1
