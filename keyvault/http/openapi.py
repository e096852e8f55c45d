"""/openapi.json as code generators expect it, from FastAPI's document plus what it cannot say.

- the configured APPID grammar on every ``appid`` parameter (declared; app_scope() enforces
  it with Python's re.fullmatch), and If-Match's grammar (headers.if_match enforces it);
- bearer ``securitySchemes``, applied per operation: the API's token on every ``/v1/``
  route, the scrape token (optional: only with ``serve --metrics-token-file``) on
  ``/metrics``, none on ``/healthz`` and ``/readyz``;
- HEAD responses without content (FastAPI declares the GET's);
- no 422: keyvault answers invalid input with 400 (errors.error_response), so FastAPI's
  generated 422 responses and their schemas are dropped;
- the webhook requests keyvault sends, as OpenAPI 3.1 ``webhooks``: one per event type,
  with the Standard Webhooks signature headers (keyvault.services.webhooks.signing).

The operationIds are set on the routes themselves (``operation_id=``): stable snake_case
names a generated client keeps across releases.
"""

from __future__ import annotations

from typing import Any

from keyvault.http.headers import IF_MATCH_PATTERN
from keyvault.http.schemas import ErrorOut, WebhookEventData, WebhookPayload
from keyvault.scope import schema_pattern

API_TOKEN = "bearerToken"
METRICS_TOKEN = "metricsToken"
SECURITY_SCHEMES = {
    API_TOKEN: {
        "type": "http",
        "scheme": "bearer",
        "description": "A keyvault access token (`keyvault token create`), sent as "
        "`Authorization: Bearer <token>` (the scheme in any case).",
    },
    METRICS_TOKEN: {
        "type": "http",
        "scheme": "bearer",
        "description": "The scrape token of `serve --metrics-token-file`; without that "
        "option /metrics needs none.",
    },
}
# Every event type a webhook can receive (webhooks.outbox.EVENT_TYPE_PREFIXES: secret.*,
# rotation.*); a test checks that the code records no other.
WEBHOOK_EVENTS = {
    "secret.created": "A scope got its first key (import).",
    "secret.rotated": "A scope got a new current key; the previous one is invalidated.",
    "rotation.failed": "A rotation failed; its state says whether it needs recovery.",
    "rotation.verification_failed": "The TA Open API refused the newly stored key.",
    "rotation.paused": "The scheduler paused a scope after repeated failures.",
    "rotation.propagated": "Every known consumer of the scope read the new version.",
    "rotation.old_key_accepted": "TA still accepts the previous key after a rotation.",
}
_SIGNATURE_HEADERS = {
    "webhook-id": "msg_<event id>: the same on every attempt (deduplicate on it)",
    "webhook-timestamp": "Unix seconds when this attempt was sent (refuse old ones)",
    "webhook-signature": 'v1,<base64 HMAC-SHA256 of "id.timestamp.body"> with the '
    "webhook's whsec_ secret",
}


def customise(schema: dict[str, Any], appid_pattern: str) -> dict[str, Any]:
    """FastAPI's document, completed as the module doc says (changed in place, returned)."""
    anchored = schema_pattern(appid_pattern)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            _declare_appid_pattern(operation, anchored)
            _declare_if_match(operation)
            responses = operation.get("responses", {})
            responses.pop("422", None)
            if method == "head":  # a HEAD response has no body
                for response in responses.values():
                    response.pop("content", None)
            security = _security_of(path)
            if security is not None:
                operation["security"] = security
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = SECURITY_SCHEMES
    _add_webhooks(schema, schemas)
    return schema


def _declare_appid_pattern(operation: dict[str, Any], pattern: str) -> None:
    for parameter in operation.get("parameters", []):
        if parameter.get("name") == "appid" and parameter.get("in") == "path":
            parameter.setdefault("schema", {})["pattern"] = pattern


def _declare_if_match(operation: dict[str, Any]) -> None:
    """If-Match as a string of its grammar (a malformed one is a 400, not a 412)."""
    for parameter in operation.get("parameters", []):
        if parameter.get("name") == "If-Match" and parameter.get("in") == "header":
            parameter["schema"] = {"type": "string", "pattern": IF_MATCH_PATTERN}


def _security_of(path: str) -> list[dict[str, list[str]]] | None:
    if path.startswith("/v1/"):
        return [{API_TOKEN: []}]
    if path == "/metrics":
        return [{METRICS_TOKEN: []}, {}]  # {}: no token, unless the server was given one
    return None


def _add_webhooks(schema: dict[str, Any], schemas: dict[str, Any]) -> None:
    for model in (WebhookPayload, WebhookEventData, ErrorOut):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in found.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas.setdefault(model.__name__, found)
    headers = [
        {"name": name, "in": "header", "required": True, "description": text,
         "schema": {"type": "string"}}
        for name, text in _SIGNATURE_HEADERS.items()
    ]  # fmt: skip
    schema["webhooks"] = {
        name: {
            "post": {
                "operationId": "webhook_" + name.replace(".", "_"),
                "summary": text,
                "description": "Sent by keyvault to each webhook whose scopes cover the "
                "event, at least once (retried with backoff until a 2xx).",
                "parameters": headers,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "allOf": [
                                    {"$ref": "#/components/schemas/WebhookPayload"},
                                    {"properties": {"type": {"const": name}}},
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "2XX": {"description": "Received; any other answer is retried"},
                },
            }
        }
        for name, text in WEBHOOK_EVENTS.items()
    }
