"""keyvault: secret management and rotation for the API keys of a self-hosted TA cluster.

The distribution is named ``ta-keyvault``; the import name and the command are ``keyvault``.
``__version__`` is the one version source: pyproject.toml reads it (hatch's version source),
so a checkout, an editable install and a wheel all report the same string without looking
up installed metadata at import time (ta-tool imports this package on every call).
"""

__version__ = "0.1.0"
DISTRIBUTION = "ta-keyvault"
