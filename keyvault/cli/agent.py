"""`keyvault agent`: the ``keyvault-agent`` command of the client distribution (keyvault_client.agent).

Its options are parsed there (one copy; `keyvault agent --help` shows them), so this command
passes its arguments through untouched.
"""

from __future__ import annotations

import click


@click.command(
    "agent",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def agent(args: tuple[str, ...]) -> None:
    """Keep TA key files current: follow rotations, rewrite atomically (see --help)."""
    from keyvault_client.agent import main

    raise SystemExit(main(list(args), prog="keyvault agent"))


COMMANDS = [agent]
