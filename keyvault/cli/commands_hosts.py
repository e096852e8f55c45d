"""Placeholder until the hosts commands land."""

COMMANDS: list = []
