"""Outgoing HTTP: the one helper behind every request keyvault makes.

Defined once in the client distribution (``keyvault_client.httpclient``, so consumers get it
without the server stack) and re-exported here for the TA Open API client and webhook
delivery. See that module for what every request guarantees (no environment proxy, no
redirect, bounded answers, scrubbed errors).
"""

from __future__ import annotations

from keyvault_client.httpclient import (
    DEFAULT_MAX_BYTES as DEFAULT_MAX_BYTES,
)
from keyvault_client.httpclient import (
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
)
from keyvault_client.httpclient import (
    HttpError as HttpError,
)
from keyvault_client.httpclient import (
    Response as Response,
)
from keyvault_client.httpclient import (
    request as request,
)
from keyvault_client.httpclient import (
    ssl_context as ssl_context,
)
