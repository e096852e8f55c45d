"""Rotation window day names are exact: an abbreviation or the full name, nothing longer."""

from __future__ import annotations

import pytest

from keyvault.errors import InvalidInput
from keyvault.services.policies import parse_window


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("Tue", {1}),
        ("Tuesday", {1}),
        ("TUESDAY", {1}),
        ("mon-wed", {0, 1, 2}),
        ("Monday-Wednesday", {0, 1, 2}),
        ("sun,Saturday", {5, 6}),
    ],
)
def test_exact_day_names_are_accepted(days, expected):
    assert parse_window(f"{days} 02:00-04:00 UTC").days == frozenset(expected)


@pytest.mark.parametrize(
    "days", ["Tuesdayx", "Tues", "Monx-Fri", "Mon-Fridays", "mon,tuesdays", "Tu", "Mond"]
)
def test_anything_else_is_refused(days):
    with pytest.raises(InvalidInput, match="invalid window"):
        parse_window(f"{days} 02:00-04:00 UTC")
