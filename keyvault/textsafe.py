"""Untrusted text made safe to print on an operator's terminal.

Request paths, token names, webhook URLs, ta-tool output and error messages can hold
control characters: an ESC sequence clears the screen or retitles the window, a newline
forges a line of output. ``printable`` escapes every control character so the text shows
what it holds (``\\x1b[2J`` stays visible as evidence, it does not act); ``strip_ansi``
removes terminal sequences outright (colours and titles in ta-tool output are noise).
JSON output needs neither: ``json.dumps`` escapes every control character itself.
"""

from __future__ import annotations

import re

# CSI (ESC [ or the 8-bit 0x9b) with its parameters and final byte; the string sequences
# (OSC ESC ], DCS ESC P, SOS ESC X, PM ESC ^, APC ESC _, or their 8-bit forms) with their
# payload, up to BEL or ST (an unterminated one runs to the end of the text); any other ESC
# sequence (ESC c resets the terminal, ESC ( B picks a character set).
_ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c|$)"
    r"|\x1b[ -/]*[0-~]"
)
# C0 controls, DEL, C1 controls; the Unicode line and paragraph separators and the
# bidirectional overrides and isolates, which reorder what the terminal shows ("Trojan Source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\x0a``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, text)


def strip_ansi(text: str) -> str:
    """``text`` without ANSI CSI and OSC sequences (what is left may still hold controls)."""
    return _ANSI.sub("", text)


def safe_line(text: str) -> str:
    """One line for an operator from text that may hold terminal output: sequences removed,
    carriage returns dropped, every other control (newlines included) escaped."""
    return printable(strip_ansi(text).replace("\r", ""))
