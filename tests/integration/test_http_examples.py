"""The consumer examples of README and docs/http.md, run against a real ``keyvault serve``:
the curl recipes (token from a file, never in argv; ETag caching) and the Node example
(docs/examples/node, Node's standard library). The database does not matter here: SQLite.

Node is required (CI's machine has it); the Go example (docs/examples/go) needs a Go
toolchain, which CI's machine does not have: it is not run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.http import World, scrub
from tests.support.timeouts import TIMEOUT

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
NODE_EXAMPLE = EXAMPLES / "node" / "keyvault-key.mjs"
SQLITE_ONLY = pytest.mark.parametrize("blank_database", ["sqlite"], indirect=True)


def token_file(world: World, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.token"
    path.write_text(world.tokens[name] + "\n")
    path.chmod(0o600)
    return path


def run(argv: list[str], world: World, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs
    )
    assert not world.holds_key(result.stderr), "an example printed a key on stderr"
    return result


def node_reads(world: World, tokens: Path, *args: str) -> list[dict]:
    node = shutil.which("node")
    assert node, "node is required for this test (CI's machine has Node 20)"
    result = run(
        [node, str(NODE_EXAMPLE), world.url, *args],
        world,
        env={**os.environ, "KEYVAULT_TOKEN_FILE": str(tokens)},
    )
    assert result.returncode == 0, scrub(result.stderr)
    assert not world.holds_key(result.stdout), "the example printed the key"
    return [json.loads(line) for line in result.stdout.splitlines()]


@SQLITE_ONLY
def test_the_node_example_caches_by_etag_and_sees_a_rotation(served: World, tmp_path):
    world = served
    tokens = token_file(world, tmp_path, "app-a1")
    with world.http("app-a1") as http:
        fingerprint = http.get("/v1/clusters/c/apps/a1").json()["fingerprint"]
    reads = node_reads(world, tokens, "c", "a1")
    assert [(r["status"], r["version"], r["etag"]) for r in reads] == [
        (200, 1, '"v1"'),
        (304, 1, '"v1"'),  # revalidated: no body, the cached key
    ]
    assert reads[0]["fingerprint"] == fingerprint
    world.import_key("c", "app:a1")  # v2
    assert [r["status"] for r in node_reads(world, tokens, "c", "a1")] == [200, 304]
    assert node_reads(world, tokens, "c", "a1")[0]["version"] == 2
    # The root key (no APPID), and a refusal as one error line naming keyvault's error code.
    root = token_file(world, tmp_path, "root-c")
    assert node_reads(world, root, "c")[0]["version"] == 1
    refused = run(
        ["node", str(NODE_EXAMPLE), world.url, "c", "a2"],
        world,
        env={**os.environ, "KEYVAULT_TOKEN_FILE": str(tokens)},
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: keyvault answered 403 forbidden: ")


def curl(world: World, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = run(["curl", "--silent", "--show-error", *args], world, input=stdin)
    assert result.returncode == 0, scrub(result.stderr)
    return result


@SQLITE_ONLY
def test_the_curl_recipes_keep_the_token_out_of_argv(served: World, tmp_path):
    world = served
    tokens = token_file(world, tmp_path, "app-a1")
    url = f"{world.url}/v1/clusters/c/apps/a1"
    # Recipe 1: a header file, made once from the token file (0600), passed as -H @FILE.
    header = tmp_path / "keyvault.header"
    header.touch(mode=0o600)
    header.write_text("Authorization: Bearer " + tokens.read_text().strip() + "\n")
    got = curl(world, "--fail-with-body", "-H", f"@{header}", url)
    assert json.loads(got.stdout)["version"] == 1
    # Recipe 2: a curl config on stdin (-K -), the header read from the token file.
    config = f'header = "Authorization: Bearer {tokens.read_text().strip()}"\n'
    got = curl(world, "--fail-with-body", "-K", "-", url, stdin=config)
    assert json.loads(got.stdout)["version"] == 1
    # Recipe 3: ETag caching: a 304 leaves the saved key as it is, a rotation replaces it.
    out, etag = tmp_path / "key.json", tmp_path / "key.etag"
    fetch = ["--fail", "-H", f"@{header}", "--etag-compare", str(etag), "--etag-save", str(etag)]
    fetch += ["-o", str(out), "-w", "%{http_code}", url]
    assert curl(world, *fetch).stdout == "200"
    assert curl(world, *fetch).stdout == "304"
    assert json.loads(out.read_text())["version"] == 1 and etag.read_text().strip() == '"v1"'
    world.import_key("c", "app:a1")  # v2
    assert curl(world, *fetch).stdout == "200"
    assert json.loads(out.read_text())["version"] == 2 and etag.read_text().strip() == '"v2"'
