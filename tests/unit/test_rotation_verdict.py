"""The reading of ta-tool's report (step 4) as a pure function: every verdict it can give."""

from __future__ import annotations

import pytest

from keyvault.services.rotation.verdict import Verdict, VerdictKind, read_verdict
from keyvault.tahost import RemoteOutput, parse_remote

PATTERN = r"[A-Za-z0-9]{64}"
KEY_A, KEY_B = "a" * 32 + "B" * 32, "c" * 32 + "D" * 32
RID = "abc123def456"


def result(out: bytes, rc: int | None = 0, errors: bytes = b"") -> RemoteOutput:
    return RemoteOutput(started=True, state="result", output=out, errors=errors, rc=rc)


def report(*lines: str) -> bytes:
    """A generate report as the host prints it (ta-tool's lines behind a '|')."""
    return "\n".join(lines).encode()


@pytest.mark.parametrize(
    ("remote", "kind"),
    [
        (result(f"secret: {KEY_A}\n".encode()), VerdictKind.KEY),
        (result(f"secret: {KEY_A}\n".encode(), rc=None), VerdictKind.KEY),
        (result(f"{KEY_A}\n{KEY_A}\n".encode()), VerdictKind.KEY),  # the same key twice is one
        (result(b"ERROR: internal error\n", rc=3), VerdictKind.TA_TOOL_FAILED),
        (result(b"", rc=None), VerdictKind.NOT_FINISHED),
        (result(b"done, nothing to show\n"), VerdictKind.NO_KEY),
        (result(f"{KEY_A}\n{KEY_B}\n".encode()), VerdictKind.AMBIGUOUS),
        (result(f"{KEY_A}\n".encode(), rc=1), VerdictKind.AMBIGUOUS),  # a key, but a failure
        (result(f"{KEY_A}x\n".encode()), VerdictKind.NO_KEY),  # a longer token is not a key
    ],
)
def test_a_finished_report_is_read_by_its_candidates_and_exit_code(remote, kind):
    verdict = read_verdict(remote, 0, PATTERN)
    assert verdict.kind is kind
    assert (verdict.key is not None) == (kind is VerdictKind.KEY)


def test_the_key_is_the_one_candidate_and_never_shown():
    verdict = read_verdict(result(f"secret: {KEY_A}\nok\n".encode()), 0, PATTERN)
    assert verdict == Verdict(VerdictKind.KEY, key=KEY_A, candidates=1, rc=0, shown=verdict.shown)
    assert KEY_A not in verdict.shown and KEY_A not in repr(verdict)


def test_ambiguous_output_counts_candidates_and_masks_them():
    verdict = read_verdict(result(f"{KEY_A}\n{KEY_B}\n".encode(), errors=b"warn\n"), 0, PATTERN)
    assert (verdict.kind, verdict.candidates, verdict.key) == (VerdictKind.AMBIGUOUS, 2, None)
    assert KEY_A not in verdict.shown and KEY_B not in verdict.shown
    assert verdict.shown == "<candidate key, 64 chars> | <candidate key, 64 chars> | warn"


def test_shown_output_is_one_line_and_bounded():
    verdict = read_verdict(result(b"x y\r\n" * 400, rc=2), 0, PATTERN)
    assert verdict.kind is VerdictKind.TA_TOOL_FAILED and verdict.rc == 2
    assert "\n" not in verdict.shown and len(verdict.shown) == 500


def test_a_cluster_pattern_decides_what_a_key_is():
    out = f"old: {KEY_A}\nsecret: {KEY_B}\n".encode()
    assert read_verdict(result(out), 0, PATTERN).kind is VerdictKind.AMBIGUOUS
    tight = read_verdict(result(out), 0, r"(?<=secret: )[A-Za-z0-9]{64}")
    assert (tight.kind, tight.key) == (VerdictKind.KEY, KEY_B)


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("nodir", VerdictKind.NO_PENDING_DIR),
        ("notatool", VerdictKind.TA_TOOL_MISSING),
        ("exists", VerdictKind.ALREADY_CLAIMED),
        ("absent", VerdictKind.ABSENT),
        ("cleaned", VerdictKind.CLEANED),
    ],
)
@pytest.mark.parametrize("exit_status", [0, 74, None])
def test_a_marker_without_a_result_names_why_ta_tool_did_not_run(state, kind, exit_status):
    remote = RemoteOutput(started=True, state=state)
    assert read_verdict(remote, exit_status, PATTERN) == Verdict(kind)


def test_a_script_that_never_started_and_ended_is_a_become_failure():
    remote = RemoteOutput(started=False, state="none", raw_tail="su: Authentication failure")
    verdict = read_verdict(remote, 1, PATTERN)
    assert verdict.kind is VerdictKind.BECOME_FAILED
    assert verdict.tail == "su: Authentication failure"


@pytest.mark.parametrize(("started", "exit_status"), [(True, 0), (True, None), (False, None)])
def test_a_report_cut_short_is_a_lost_connection(started, exit_status):
    remote = RemoteOutput(started=started, state="none")
    assert read_verdict(remote, exit_status, PATTERN).kind is VerdictKind.CONNECTION_LOST


def test_real_reports_through_parse_remote():
    key_report = report(
        f"@@KV:{RID}:START@@",
        f"@@KV:{RID}:OUT@@",
        f"|secret: {KEY_A}",
        f"@@KV:{RID}:ERR@@",
        f"@@KV:{RID}:RC:0@@",
    )
    verdict = read_verdict(parse_remote(RID, key_report), 0, PATTERN)
    assert (verdict.kind, verdict.key) == (VerdictKind.KEY, KEY_A)
    # A key-shaped line of ta-tool's output cannot pass for a marker, nor a marker for output.
    fake = report(
        f"@@KV:{RID}:START@@", f"@@KV:{RID}:OUT@@", f"|@@KV:{RID}:RC:0@@", f"@@KV:{RID}:ERR@@"
    )
    assert read_verdict(parse_remote(RID, fake), None, PATTERN).kind is VerdictKind.CONNECTION_LOST
    missing = report(f"@@KV:{RID}:START@@", f"@@KV:{RID}:NOTATOOL@@")
    assert read_verdict(parse_remote(RID, missing), 74, PATTERN).kind is VerdictKind.TA_TOOL_MISSING
    nothing = parse_remote(RID, b"su: Authentication failure\n")
    assert read_verdict(nothing, 1, PATTERN).kind is VerdictKind.BECOME_FAILED
    assert read_verdict(nothing, None, PATTERN).kind is VerdictKind.CONNECTION_LOST


def test_every_kind_is_reachable():
    """The tests above cover each kind read_verdict can return."""
    covered = {
        VerdictKind.KEY,
        VerdictKind.TA_TOOL_FAILED,
        VerdictKind.NOT_FINISHED,
        VerdictKind.NO_KEY,
        VerdictKind.AMBIGUOUS,
        VerdictKind.NO_PENDING_DIR,
        VerdictKind.TA_TOOL_MISSING,
        VerdictKind.ALREADY_CLAIMED,
        VerdictKind.ABSENT,
        VerdictKind.CLEANED,
        VerdictKind.BECOME_FAILED,
        VerdictKind.CONNECTION_LOST,
    }
    assert covered == set(VerdictKind)
