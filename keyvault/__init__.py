"""keyvault: secret management and rotation for the API keys of a self-hosted TA cluster."""

__version__ = "0.1.0"
