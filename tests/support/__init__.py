"""What the tests share, loaded by ``tests/conftest.py`` through ``pytest_plugins``.

- ``db``: the database fixtures (``db_url`` on SQLite and PostgreSQL, ``database``,
  ``blank_database``, ``engine``, ``postgres_server``).
- ``cli``: the keyvault CLI harness: an isolated home (``home``, ``env``), keyvault
  in-process (``cli``, click's CliRunner) and as a real process (``run_keyvault``).
- ``cluster``: an emulated TA cluster (the ta-tool emulator behind a local transport).
- ``clock``: the injected clock.
- ``http``: a real ``keyvault serve`` on a populated store (``served``).
- ``sshd``: the real test sshd (``sshd_env``, ``ta_sim``), ``postgres_url`` and the
  ``sshd``/``postgres`` markers; ``sshd_env`` reads tests/sshd/setup.sh's sshd.json.
- ``leak_guard``: no generated key may appear in the run's captured output.
- ``timeouts``: the one bound on subprocesses and waits.
"""
