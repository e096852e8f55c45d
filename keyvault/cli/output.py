"""Printing: JSON for machines, aligned tables for people, masked keys."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from keyvault.textsafe import printable, safe_line

OUTPUT_FORMATS = ("table", "json")


def emit_json(data) -> None:
    """Print ``data`` as indented JSON (``json.dumps`` escapes every control character)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def emit_table(rows: Iterable[dict], columns: Sequence[str], *, empty: str = "(none)") -> None:
    """Print rows as an aligned table with the given columns; control characters in a cell
    are escaped (a cell may hold a request path, a URL or remote output)."""
    rows = list(rows)
    if not rows:
        click.echo(empty)
        return
    cells = [
        [("" if r.get(c) is None else printable(str(r.get(c)))) for c in columns] for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo(
        "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=False)).rstrip()
    )
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


def echo_safe(text: str, *, err: bool = False) -> None:
    """Print one line that holds untrusted text (remote output, a stored name or URL): ANSI
    sequences removed, other control characters escaped, so it cannot act on the terminal."""
    click.echo(safe_line(text), err=err)


def mask(key: str) -> str:
    """Show the shape of a key, never enough of it to use."""
    return f"******** ({len(key)} chars; --reveal to print)"


def scope_options(func):
    """Add ``--cluster``, ``--root`` and ``--appid`` to a command."""
    from keyvault.cli.params import complete_appids, complete_clusters

    func = click.option(
        "--appid", shell_complete=complete_appids, help="The project APPID (a project key)."
    )(func)
    func = click.option(
        "--root", "is_root", is_flag=True, help="The root key (valid for every project)."
    )(func)
    func = click.option(
        "--cluster", required=True, shell_complete=complete_clusters, help="Cluster name."
    )(func)
    return func


def resolve_scope(is_root: bool, appid: str | None, settings):
    """Exactly one of ``--root`` / ``--appid``, validated."""
    from keyvault.scope import app_scope, root_scope

    if is_root == (appid is not None):
        raise click.UsageError("give exactly one of --root or --appid APPID")
    return root_scope() if appid is None else app_scope(appid, settings.appid_pattern)


def output_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``-o/--output table|json`` (default ``$KEYVAULT_OUTPUT``, else table) and ``--json``.

    The command receives one ``as_json`` boolean: ``--json`` is the short form of
    ``--output json`` and wins over the environment.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, output: str, json_flag: bool, **kwargs: Any) -> Any:
        return func(*args, as_json=json_flag or output == "json", **kwargs)

    wrapper = click.option("--json", "json_flag", is_flag=True, help="Same as --output json.")(
        wrapper
    )
    return click.option(
        "-o",
        "--output",
        type=click.Choice(OUTPUT_FORMATS),
        envvar="KEYVAULT_OUTPUT",
        default="table",
        show_default=True,
        show_envvar=True,
        help="Output format.",
    )(wrapper)
