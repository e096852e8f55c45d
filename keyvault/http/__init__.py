"""The HTTP service: current keys for services, with scoped tokens, audit and events."""
