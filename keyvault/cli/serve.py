"""`keyvault serve`."""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from keyvault.cli.context import AppContext

LOOPBACK = ("127.0.0.1", "::1", "localhost")
STARTUP_FAILURE = 3  # uvicorn's exit status when the application did not start


@click.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told)."
)
@click.option(
    "--port",
    default=8200,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0: any free port (the one bound is printed).",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-webhooks", is_flag=True, help="Do not deliver webhooks from this server.")
@click.option(
    "--scheduler",
    is_flag=True,
    help="Also run `rotate due` every minute (a lease lets one replica act).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="KEYVAULT_LOG_FORMAT",
    show_envvar=True,
    help="Log lines (one access line per request) as text or JSON objects "
    "[default: the global --log-format, else text].",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    envvar="KEYVAULT_ACCESS_LOG",
    help="One log line per request (costs the key read about a third of its throughput).",
)
@click.option(
    "--forwarded-allow-ips",
    metavar="IPS",
    envvar="KEYVAULT_FORWARDED_ALLOW_IPS",
    show_envvar=True,
    help="Comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto are "
    "believed (the audit's client address). Without it, those headers are ignored.",
)
@click.option(
    "--db-budget",
    type=click.FloatRange(0.1, 300),
    default=5.0,
    show_default=True,
    envvar="KEYVAULT_HTTP_DB_BUDGET",  # keyvault.http.app.DB_BUDGET_ENV (read by each worker)
    show_envvar=True,
    help="Seconds a request may wait for the database (its audit record included); then 503.",
)
@click.option(
    "--revision-recheck-ms",
    type=click.IntRange(0, 60_000),
    default=1000,
    show_default=True,
    envvar="KEYVAULT_REVISION_RECHECK_MS",  # keyvault.http.state.RECHECK_ENV (read by each worker)
    show_envvar=True,
    help="PostgreSQL: while change notifications are heard, read the revision counter at most "
    "this often anyway; bounds how long a lost notification can serve a revoked token or an "
    "old key (0: on every request).",
)
@click.option(
    "--metrics-token-file",
    type=click.Path(exists=True, dir_okay=False),
    envvar="KEYVAULT_METRICS_TOKEN_FILE",  # keyvault.http.app.METRICS_TOKEN_FILE_ENV
    show_envvar=True,
    help="/metrics answers only with `Authorization: Bearer <the token in this file>`.",
)
@click.option(
    "--allow-private-network",
    is_flag=True,
    envvar="KEYVAULT_ALLOW_PRIVATE_NETWORK",  # keyvault.http.app.ALLOW_PRIVATE_NETWORK_ENV
    show_envvar=True,
    help="Deliver webhooks to loopback, link-local and private addresses too "
    "(refused by default: a webhook URL must not reach what only keyvault can).",
)
@click.option(
    "--audit-durability",
    type=click.Choice(["fast", "durable", "journal"]),
    envvar="KEYVAULT_AUDIT_DURABILITY",  # keyvault.config reads it in each worker
    show_envvar=True,
    help="fast: an audit record survives a crash of keyvault, not of the database's host; "
    "durable: flushed to disk before the key is sent; journal: written to a local file "
    "before the key is sent, shipped to the database right after (docs/deployment.md) "
    "[default: [audit] durability, else fast].",
)
@click.pass_obj
def serve(
    app: AppContext,
    host: str,
    port: int,
    workers: int,
    tls_cert: str | None,
    tls_key: str | None,
    no_webhooks: bool,
    scheduler: bool,
    log_format: str | None,
    access_log: bool,
    forwarded_allow_ips: str | None,
    db_budget: float,
    revision_recheck_ms: int,
    metrics_token_file: str | None,
    allow_private_network: bool,
    audit_durability: str | None,
) -> None:
    """Serve current keys over HTTP to services holding scoped tokens."""
    import logging
    import os

    if workers == 1:  # one process, one plain registry (read before prometheus_client loads)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from keyvault import logs
    from keyvault.db import require_head
    from keyvault.http.app import (
        ACCESS_LOG_ENV,
        ALLOW_PRIVATE_NETWORK_ENV,
        DB_BUDGET_ENV,
        LOG_FORMAT_ENV,
        METRICS_TOKEN_FILE_ENV,
    )
    from keyvault.http.routers.metrics import read_metrics_token
    from keyvault.http.state import RECHECK_ENV

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    if audit_durability:
        os.environ["KEYVAULT_AUDIT_DURABILITY"] = audit_durability
    app.settings.audit_durability  # noqa: B018 - a bad [audit] durability fails here, once
    require_head(app.engine)  # fail here, with a clear error, not in every worker
    app.keyring_check()
    if host not in LOOPBACK and not tls_cert:
        click.echo(f"warning: serving keys on {host} without TLS", err=True)
    # `keyvault --log-format json serve` means the same as `keyvault serve --log-format json`.
    log_format = log_format or click.get_current_context().find_root().params.get("log_format")
    log_format = log_format or "text"
    # Read by each worker process (uvicorn's factory, keyvault.http.app.serve_app).
    os.environ[LOG_FORMAT_ENV] = log_format
    os.environ[ACCESS_LOG_ENV] = "1" if access_log else "0"
    if no_webhooks:
        os.environ["KEYVAULT_SERVE_WEBHOOKS"] = "0"
    if scheduler:
        os.environ["KEYVAULT_SERVE_SCHEDULER"] = "1"
    os.environ[DB_BUDGET_ENV] = str(db_budget)
    os.environ[RECHECK_ENV] = str(revision_recheck_ms)
    os.environ[ALLOW_PRIVATE_NETWORK_ENV] = "1" if allow_private_network else "0"
    if metrics_token_file:
        read_metrics_token(metrics_token_file)  # a bad file fails here, once, clearly
        os.environ[METRICS_TOKEN_FILE_ENV] = os.path.abspath(metrics_token_file)
    # Replaces the group's handler (keyvault.logs installs one, by name): INFO, the access lines.
    logs.configure(log_format, level=logging.INFO)
    _run(host, port, workers, tls_cert, tls_key, forwarded_allow_ips)


def _run(
    host: str,
    port: int,
    workers: int,
    tls_cert: str | None,
    tls_key: str | None,
    forwarded_allow_ips: str | None,
) -> None:
    """Bind, say where (the real port, also for --port 0), and serve until stopped."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from keyvault.http.protocol import LimitedHttpToolsProtocol

    config = uvicorn.Config(
        "keyvault.http.app:serve_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        log_config=None,  # keyvault.logs formats every record, uvicorn's too
        log_level="warning",
        access_log=False,  # keyvault logs its own access lines (no raw paths)
        server_header=False,
        lifespan="on",
        # Proxy headers only from the proxies named: uvicorn's default believes any local
        # client, which could then forge the audit's client address.
        proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=forwarded_allow_ips or "",
        # httptools with a limit: a request line and headers over 16 KiB are refused
        # (400) once that much is read, never buffered whole (keyvault/http/protocol.py).
        http=LimitedHttpToolsProtocol,
    )
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"keyvault listening on {'https' if tls_cert else 'http'}://{shown}:{bound}"
        f" ({workers} worker(s))",
        err=True,
    )
    if workers > 1:
        from keyvault.http.metrics import multiprocess_dir

        with multiprocess_dir():  # the workers' metric files: one scrape counts them all
            Multiprocess(config, sockets=[sock]).run()
        return
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn has shut down already
        server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket's address, bound here (as uvicorn would) to report the real port."""
    from keyvault.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="choose another --port or --host, or stop the process using it",
        ) from None
    sock.set_inheritable(True)  # the worker processes serve on it
    return sock


COMMANDS = [serve]
