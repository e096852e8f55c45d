"""check_old_key against a real local HTTP server answering TA envelopes: only a refusal of
the key itself is ``rejected``; any other TA error (busy, bad call) proves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keyvault.config import Settings
from keyvault.models import Cluster
from keyvault.scope import root_scope
from keyvault.services.verify import (
    OLD_KEY_ACCEPTED,
    OLD_KEY_REJECTED,
    OLD_KEY_UNCHECKED,
    KeyCheckOutcome,
    check_old_key,
)
from keyvault.ta import TaClient
from tests.unit.test_ta_client import envelope, fake_ta  # noqa: F401 - the fixture

OLD = "kvOLD" + "x" * 59
SETTINGS = Settings(home=Path("/nonexistent"), database_url="sqlite://", master_key_file=Path("/x"))
VERIFIED = KeyCheckOutcome("verified", 0, "POST open/project-list answered return_code 0")


def _check(url: str, **client_options) -> str:
    cluster = Cluster(name="c", open_api_url=url, options=json.dumps({}))

    def factory(base_url: str, **kwargs) -> TaClient:
        return TaClient(base_url, **{**kwargs, **client_options})

    state, _ = check_old_key(
        cluster, root_scope(), OLD, VERIFIED, settings=SETTINGS, client_factory=factory
    )
    return state


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (0, "success", OLD_KEY_ACCEPTED),
        (-1008, "Invalid access", OLD_KEY_REJECTED),  # the key-refusal message
        (1500, "system busy", OLD_KEY_UNCHECKED),  # was `rejected`: any non-zero code
        (-1999, "project 9 not found", OLD_KEY_UNCHECKED),
    ],
)
def test_only_a_refused_key_is_rejected(fake_ta, code, message, expected):
    fake_ta.json("/open/project-list", envelope(code, message))
    assert _check(fake_ta.base_url) == expected


def test_a_configured_invalid_key_code_is_rejected(fake_ta):
    fake_ta.json("/open/project-list", envelope(-1777, "nope"))
    assert _check(fake_ta.base_url) == OLD_KEY_UNCHECKED
    assert _check(fake_ta.base_url, invalid_key_codes=[-1777]) == OLD_KEY_REJECTED
