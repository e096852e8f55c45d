"""TA simulator: a stand-in TA cluster for demos and tests (not TA).

``state`` and ``tatool`` emulate ta-tool (stdlib only: it runs once per key as the ta
user), ``openapi`` the Open API, ``sshfront`` (with ``commands`` and ``sshkeys``) an SSH
server that runs only keyvault's own scripts; ``run`` is all of them as one background
process and ``registration`` puts it in keyvault's store as cluster ``sandbox``.
"""
