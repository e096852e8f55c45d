"""keyvault.textsafe: untrusted text cannot act on a terminal once it went through it."""

from __future__ import annotations

import json

import pytest

from keyvault.textsafe import printable, safe_line, strip_ansi

EVERY_CONTROL = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))


def test_printable_escapes_every_c0_c1_control_and_del():
    shown = printable(EVERY_CONTROL)
    assert shown.isprintable() and shown.isascii()
    assert shown == "".join(f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)])


def test_printable_escapes_line_separators_and_bidi_overrides():
    assert printable("a\u2028b\u2029c\u202ed\u2066e") == "a\\u2028b\\u2029c\\u202ed\\u2066e"


@pytest.mark.parametrize(
    "text",
    ["plain text", "kvt_AbC-123.xyz", "app:a1 / root", "ünïcödé ключ 密钥", "tab-free  spaces"],
)
def test_printable_keeps_ordinary_text(text):
    assert printable(text) == text


def test_a_hostile_request_path_cannot_clear_the_screen_or_forge_a_line():
    path = "/v1/clusters/c/apps/\x1b[2J\nINFO all good"
    shown = printable(path)
    assert "\x1b" not in shown and "\n" not in shown
    assert shown == "/v1/clusters/c/apps/\\x1b[2J\\x0aINFO all good"


@pytest.mark.parametrize(
    ("raw", "left"),
    [
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b[2J\x1b[H", ""),
        ("\x1b[?25lhidden cursor", "hidden cursor"),
        ("\x1b]0;window title\x07after", "after"),
        ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("\x9b31mC1 CSI", "C1 CSI"),
        ("\x9d0;title\x9cafter", "after"),
        ("before\x1b]0;unterminated title", "before"),
        ("\x1bcreset", "reset"),
        ("\x1bPq#0;2;0;0;0sixel payload\x1b\\after", "after"),
        ("\x1b_application command\x07", ""),
        ("\x1b(Bcharset", "charset"),
    ],
)
def test_strip_ansi_removes_whole_csi_and_osc_sequences(raw, left):
    assert strip_ansi(raw) == left


def test_safe_line_strips_sequences_then_escapes_what_is_left():
    raw = "ta-tool: \x1b[1;31merror\x1b[0m\r\n\x1b]0;pwned\x07bell\x07 done"
    assert safe_line(raw) == "ta-tool: error\\x0abell\\x07 done"


def test_json_output_escapes_controls_itself(capsys):
    from keyvault.cli.output import emit_json

    emit_json({"scope": EVERY_CONTROL + "\u202e"})
    dumped = capsys.readouterr().out
    assert dumped.isascii() and all(c.isprintable() or c == "\n" for c in dumped)
    assert json.loads(dumped)["scope"] == EVERY_CONTROL + "\u202e"
