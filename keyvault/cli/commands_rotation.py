"""Placeholder until the rotation commands land."""

COMMANDS: list = []
