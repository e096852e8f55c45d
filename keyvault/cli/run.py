"""`keyvault run`: the ``keyvault-run`` command of the client distribution (keyvault_client.run).

Its options are parsed there (one copy; `keyvault run --help` shows them), so this command
passes its arguments through untouched.
"""

from __future__ import annotations

import click


@click.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(args: tuple[str, ...]) -> None:
    """Run a command with a TA key in its environment; restart or signal it on rotation."""
    from keyvault_client.run import main

    raise SystemExit(main(list(args), prog="keyvault run"))


COMMANDS = [run]
