"""keyvault_client: consume TA keys served by keyvault, without the server stack.

    from keyvault_client import Client

    kv = Client()                          # KEYVAULT_ADDR, KEYVAULT_TOKEN(_FILE)
    info = kv.get_app("prod", "APP1")      # KeyInfo; repr() hides the key
    for change in kv.watch():              # rotations of the scopes it holds
        ...

Also ``keyvault-agent`` (keys to files) and ``keyvault-run`` (a process supervisor); see
docs/consumers.md. Standard library only. The names below are imported on first use, so
``import keyvault_client.fsutil`` (the ta-tool emulator, on every call) stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
DISTRIBUTION = "ta-keyvault-client"

_LAZY = {
    "Client": "keyvault_client.client",
    "KeyInfo": "keyvault_client.client",
    "Rotation": "keyvault_client.client",
    "Request": "keyvault_client.transport",
    "Response": "keyvault_client.transport",
    "KeyvaultError": "keyvault_client.errors",
    "InvalidInput": "keyvault_client.errors",
    "Unauthorized": "keyvault_client.errors",
    "Forbidden": "keyvault_client.errors",
    "NotFound": "keyvault_client.errors",
    "Conflict": "keyvault_client.errors",
    "Unavailable": "keyvault_client.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keyvault_client' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - lazy on purpose (see the docstring)

    return getattr(importlib.import_module(module), name)
