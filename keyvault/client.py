"""Consumer client of keyvault's HTTP API, with ``call_ta`` for services that call TA.

    from keyvault.client import Client

    with Client("http://127.0.0.1:8200", token) as kv:
        info = kv.get_app("prod", "APP1")            # KeyInfo; repr() hides the key
        data = kv.call_ta("prod", appid="APP1", api_path="open/list-event-meta",
                          params={"projectId": 1}, ta_base_url="http://ta2:8992")

The client itself (failover across addresses, KEYVAULT_ADDR / KEYVAULT_TOKEN(_FILE),
retries with backoff, stale-if-error, ``watch``/``on_rotate``, an injectable transport) is
``keyvault_client.Client``, from the light ``ta-keyvault-client`` distribution (standard
library only; see its docstring and docs/consumers.md). This module adds ``call_ta``, which
needs the TA Open API client of the server package: when TA refuses the key (it was rotated
between our read and TA's check), it drops the cached entry, fetches again and retries once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from keyvault.errors import TaApiError
from keyvault.ta import TaClient, is_key_rejected
from keyvault_client.client import Client as _Client
from keyvault_client.client import KeyInfo, Rotation, scope_of

__all__ = ["Client", "KeyInfo", "Rotation"]


class Client(_Client):
    """``keyvault_client.Client`` plus ``call_ta``."""

    def call_ta(
        self,
        cluster: str,
        *,
        appid: str | None = None,
        api_path: str,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        ta_base_url: str,
        ta_client_factory: Callable[[str], TaClient] | None = None,
    ) -> Any:
        """Call the TA Open API with the current key (app key if ``appid``, else root).

        Returns the envelope's ``data``. When TA answers that the key is invalid, the cached
        entry is dropped, the key fetched again and the call retried once; any other error
        (and the retry's own) is raised: TaApiError, TaTransportError or a keyvault error.
        ``ta_client_factory(ta_base_url)`` builds the TaClient (e.g. to pass the cluster's
        ``invalid_key_codes``); the default is ``TaClient(ta_base_url)``.
        """
        ta = (ta_client_factory or TaClient)(ta_base_url)
        scope = scope_of(appid)

        def call() -> Any:
            info = self.get_root(cluster) if appid is None else self.get_app(cluster, appid)
            return ta.call(
                api_path, token=info.key, method=method, params=params, json_body=json_body
            )

        try:
            return call()
        except TaApiError as exc:
            rejected = getattr(ta, "is_key_rejected", None)
            if not (rejected(exc) if callable(rejected) else is_key_rejected(exc)):
                raise
        self.refresh(cluster, scope)
        return call()
