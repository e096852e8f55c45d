"""`keyvault serve`."""

from __future__ import annotations

import click

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@click.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told)."
)
@click.option("--port", default=8200, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-webhooks", is_flag=True, help="Do not deliver webhooks from this server.")
@click.option(
    "--scheduler",
    is_flag=True,
    help="Also run `rotate due` every minute (a lease lets one replica act).",
)
@click.pass_obj
def serve(app, host, port, workers, tls_cert, tls_key, no_webhooks, scheduler) -> None:
    """Serve current keys over HTTP to services holding scoped tokens."""
    import os

    import uvicorn

    from keyvault.db import require_head

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    require_head(app.engine)  # fail here, with a clear error, not in every worker
    app.keyring_check()
    if host not in LOOPBACK and not tls_cert:
        click.echo(f"warning: serving keys on {host} without TLS", err=True)
    if no_webhooks:
        os.environ["KEYVAULT_SERVE_WEBHOOKS"] = "0"  # read by each worker's settings
    if scheduler:
        os.environ["KEYVAULT_SERVE_SCHEDULER"] = "1"
    click.echo(
        f"keyvault serving on {'https' if tls_cert else 'http'}://{host}:{port} ({workers} worker(s))",
        err=True,
    )
    uvicorn.run(
        "keyvault.http.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
    )


COMMANDS = [serve]
