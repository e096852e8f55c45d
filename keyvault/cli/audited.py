"""`@audited`: every CLI command that reads a key or changes state leaves an audit trail.

The one place that does it, as Vault's audit devices do for requests: before the command
acts, its intent (who, what, on which object) is committed in a transaction of its own;
when it ends, its outcome ("ok" or the error code) is committed in another. If the intent
cannot be written the command does not run: one `error:` line, non-zero exit. A command
that ran but whose outcome cannot be written keeps its own result (it has acted; failing it
now would invite a retry, and a retried rotation kills the key it made) and says so on stderr.

    @token.command("revoke")
    @click.argument("name")
    @click.pass_obj
    @audited("token.revoke", about=lambda p: {"target": f"token:{p['name']}"})
    def token_revoke(app, name): ...

``about(params)`` names the object from the command's parameters (keys ``cluster``,
``scope``, ``target``, ``detail``; values never secrets); ``when(params)`` false skips the
audit (`secrets show` without ``--reveal`` prints no key). The decorator goes right above
the function, under ``@click.pass_obj``: it receives the AppContext and the parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from keyvault.errors import DatabaseError, KeyvaultError

if TYPE_CHECKING:
    from keyvault.cli.context import AppContext
    from keyvault.models import AuditRecord
    from keyvault.services.audit_chain import AuditChain

Params = dict[str, Any]
About = Callable[[Params], dict[str, str | None]]


def scope_of(params: Params) -> str | None:
    """The scope named by ``--root`` / ``--appid`` (unvalidated: the command validates)."""
    if params.get("is_root"):
        return "root"
    return f"app:{params['appid']}" if params.get("appid") else None


def key_scope(params: Params) -> dict[str, str | None]:
    """``about`` for commands with ``--cluster`` and ``--root``/``--appid``."""
    return {"cluster": params.get("cluster"), "scope": scope_of(params)}


def audited(
    action: str, *, about: About | None = None, when: Callable[[Params], bool] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a command so that its intent is committed before it runs and its outcome after."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(app: AppContext, *args: Any, **params: Any) -> Any:
            if when is not None and not when(params):
                return func(app, *args, **params)
            intent = _write_intent(app, action, about(params) if about else {})
            try:
                result = func(app, *args, **params)
            except BaseException as exc:
                _write_outcome(app, intent, *outcome_of(exc))
                raise
            _write_outcome(app, intent, "ok", None)
            return result

        return wrapper

    return decorate


def _write_intent(app: AppContext, action: str, about: dict[str, str | None]) -> AuditRecord:
    from keyvault.services.audit import record_intent

    try:
        chain = app_chain(app)  # a sink that cannot be written: ConfigError, no act
        with app.transaction() as session:
            return record_intent(
                session,
                chain=chain,
                actor=app.settings.actor,
                action=action,
                cluster=about.get("cluster"),
                scope=about.get("scope"),
                target=about.get("target"),
                detail=about.get("detail"),
            )
    except DatabaseError as exc:
        raise DatabaseError(
            f"cannot write the audit record of {action}, so nothing was done ({exc.message})",
            hint="check the database (and its audit_log table), then retry",
        ) from None


def _write_outcome(app: AppContext, intent: AuditRecord, outcome: str, detail: str | None) -> None:
    from keyvault.services.audit import record_outcome

    try:
        with app.transaction() as session:
            record_outcome(session, intent, chain=app_chain(app), outcome=outcome, detail=detail)
    except KeyvaultError as exc:  # the command's own result stands; say what the log lacks
        reason = exc.message
        click.echo(
            f"warning: {intent.action} ended ({outcome}) but its outcome could not be written "
            f"to the audit log (intent record {intent.id}): {reason}",
            err=True,
        )


def app_chain(app: AppContext) -> AuditChain:
    """The command's audit chain (its chain keys and sink), made once per invocation."""
    from keyvault.services.audit_chain import chain_for

    chain: AuditChain | None = getattr(app, "_audit_chain", None)
    if chain is None:
        chain = chain_for(app.settings)
        app._audit_chain = chain  # type: ignore[attr-defined]
    return chain


def outcome_of(exc: BaseException) -> tuple[str, str | None]:
    """The audit outcome and detail of a command that ended with ``exc``."""
    if isinstance(exc, KeyvaultError):
        return exc.code, str(exc)
    if isinstance(exc, click.Abort):
        return "not_confirmed", None
    if isinstance(exc, click.UsageError):
        return "usage_error", exc.format_message()
    if isinstance(exc, click.exceptions.Exit):
        return ("ok", None) if exc.exit_code == 0 else ("failed", f"exit {exc.exit_code}")
    if isinstance(exc, SystemExit):
        return ("ok", None) if exc.code in (0, None) else ("failed", f"exit {exc.code}")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", None
    return "internal_error", type(exc).__name__
