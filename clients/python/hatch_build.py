"""Build hook: the package is ``keyvault_client`` at the repository root, next to ``keyvault``.

One copy of the source, importable wherever ``keyvault`` is (a checkout on PYTHONPATH, the
TA simulator's ``python -S`` emulator, site-packages). The wheel copies it in; an editable
install copies nothing and points a .pth at the repository root (``dev-mode-dirs``), so
edits are live.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ClientSource(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "standard":
            build_data["force_include"]["../../keyvault_client"] = "keyvault_client"
