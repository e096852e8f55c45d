"""Step 4 (PARSE) as a pure function: what ta-tool's report says, without acting on it.

:func:`read_verdict` takes the parsed remote report (``tahost.parse_remote``), the exit
status of the SSH command and the cluster's key pattern, and returns a
:class:`Verdict`. It does no I/O; the caller records and raises (see ``steps.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from keyvault.tahost import RemoteOutput, find_keys, mask_keys


class VerdictKind(StrEnum):
    """What a generate or fetch report means."""

    KEY = "key"  # exactly one candidate key and ta-tool did not report failure
    TA_TOOL_FAILED = "ta_tool_failed"  # non-zero exit and nothing that looks like a key
    NOT_FINISHED = "not_finished"  # no exit status and no key yet
    NO_KEY = "no_key"  # finished, no candidate key
    AMBIGUOUS = "ambiguous"  # several candidate keys, or one with a failing exit status
    NO_PENDING_DIR = "no_pending_dir"  # ~ta/.keyvault/pending could not be created
    TA_TOOL_MISSING = "ta_tool_missing"  # ta-tool is not on ta's PATH
    ALREADY_CLAIMED = "already_claimed"  # a pending file for the id existed: ta-tool did not run
    ABSENT = "absent"  # (fetch) no pending file: ta-tool never ran for the id
    CLEANED = "cleaned"  # (fetch) the pending file was deleted (only after a store)
    BECOME_FAILED = "become_failed"  # the script never started and the command ended
    CONNECTION_LOST = "connection_lost"  # the report was cut short after ta-tool may have run


@dataclass(frozen=True)
class Verdict:
    """The reading of one report. ``key`` is set only for ``KEY``; ``shown`` is masked."""

    kind: VerdictKind
    key: str | None = field(default=None, repr=False)
    candidates: int = 0
    rc: int | None = None
    shown: str = ""  # ta-tool's output and errors, keys masked, one line, at most 500 chars
    tail: str = field(default="", repr=False)  # the raw end of the output (BECOME_FAILED)


_BY_STATE = {
    "nodir": VerdictKind.NO_PENDING_DIR,
    "notatool": VerdictKind.TA_TOOL_MISSING,
    "exists": VerdictKind.ALREADY_CLAIMED,
    "absent": VerdictKind.ABSENT,
    "cleaned": VerdictKind.CLEANED,
}


def _shown(remote: RemoteOutput, pattern: str) -> str:
    text = mask_keys((remote.output + b"\n" + remote.errors).decode("utf-8", "replace"), pattern)
    lines = (line.strip() for line in text.replace("\r", "").splitlines())
    return " | ".join(line for line in lines if line)[:500]


def _read_result(remote: RemoteOutput, pattern: str) -> Verdict:
    candidates = find_keys(remote.output, pattern)
    shown, rc = _shown(remote, pattern), remote.rc
    if len(candidates) == 1 and rc in (0, None):
        return Verdict(VerdictKind.KEY, key=candidates[0], candidates=1, rc=rc, shown=shown)
    if not candidates and rc not in (0, None):
        return Verdict(VerdictKind.TA_TOOL_FAILED, rc=rc, shown=shown)
    if not candidates and rc is None:
        return Verdict(VerdictKind.NOT_FINISHED, shown=shown)
    kind = VerdictKind.NO_KEY if not candidates else VerdictKind.AMBIGUOUS
    return Verdict(kind, candidates=len(candidates), rc=rc, shown=shown)


def read_verdict(remote: RemoteOutput, exit_status: int | None, pattern: str) -> Verdict:
    """What ``remote`` (a generate or fetch report) says, given the command's exit status."""
    if remote.state == "result":
        return _read_result(remote, pattern)
    kind = _BY_STATE.get(remote.state)
    if kind is not None:
        return Verdict(kind)
    if not remote.started and exit_status is not None:
        return Verdict(VerdictKind.BECOME_FAILED, tail=remote.raw_tail)
    return Verdict(VerdictKind.CONNECTION_LOST)
