"""Use cases. Services take the session (and transport, settings) as keyword
arguments and only ``flush()``; the entrypoint owns the transaction. The
rotation service is the documented exception (see docs/rotation.md)."""
