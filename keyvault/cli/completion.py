"""`keyvault completion bash|zsh|fish`: the shell script that completes keyvault's words."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")
# click's protocol: the script calls keyvault back with this variable set.
COMPLETE_VAR = "_KEYVAULT_COMPLETE"


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (commands, options, clusters, APPIDs, rotation ids).

    \b
    bash: eval "$(keyvault completion bash)"   (in ~/.bashrc)
    zsh:  eval "$(keyvault completion zsh)"    (in ~/.zshrc, after compinit)
    fish: keyvault completion fish > ~/.config/fish/completions/keyvault.fish

    Names come from the database when it is reachable; otherwise only commands and
    options are completed (no error is ever printed into the shell).
    """
    from click.shell_completion import get_completion_class

    complete_class = get_completion_class(shell)
    assert complete_class is not None  # every name in SHELLS is one click ships
    root = ctx.find_root().command
    script = complete_class(root, {}, "keyvault", COMPLETE_VAR).source()
    click.echo(script)


COMMANDS = [completion]
