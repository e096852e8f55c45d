"""TA simulator: a stand-in TA cluster (ta-tool emulator, Open API emulator) for demos and tests."""
