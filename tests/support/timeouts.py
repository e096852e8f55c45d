"""The one bound on how long a test waits for a subprocess, a thread or a polled condition.

It is an upper bound that only a hang reaches, never a duration that must elapse: a
passing test waits exactly as long as the work takes. It is generous because the suite
runs on two cores shared with other work (CI, other test runs): a ``python -m keyvault``
that starts in a second on an idle machine has been seen to need more than a minute
under load, and a ``timeout=30`` then failed a correct test
(test_sandbox_openapi::test_cli_serves_until_interrupted). A tight bound is a flaky
test; a generous one only makes a broken run report later. pytest-timeout's per-test
limit (pyproject.toml) stays above it, so the test's own message is what is reported.
"""

from __future__ import annotations

TIMEOUT = 240.0  # seconds
