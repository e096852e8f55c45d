"""keyvault's test suite; a package so that ``tests.support`` is importable by that name."""
