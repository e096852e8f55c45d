# Two commands do all set-up on a fresh machine:
#   make demo   a real rotation over SSH against the bundled TA simulator
#   make test   the test suite (as root it also sets up the real sshd test host)
SHELL := /bin/bash
# Debian's python when present: the test sshd's `ta` user must be able to run the
# venv's interpreter (pyenv's lives under /root, mode 0700).
BASE_PY := $(shell [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (TEST_WORKERS=0: one process). Much of a test's time
# is spent waiting on subprocesses and PostgreSQL. The tests marked sshd share the ta-tool
# emulator's state: they run after, in one process, one after another. (xdist's loadgroup
# cannot group them: it renames node ids through an attribute pytest 9.2 no longer reads.)
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint venv clean bench faultloop

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	@[ -x $(PY) ] || $(BASE_PY) -m venv $(VENV)
	@# The distribution was called `keyvault` before it became `ta-keyvault`.
	@$(PY) -m pip uninstall -y -q keyvault 2>/dev/null || true
	@# The light client distribution (clients/python) first: ta-keyvault depends on it.
	$(PY) -m pip install --progress-bar off -q -e clients/python -e '.[postgres,test,lint]'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	@bash ops/demo.sh

test: venv
	@if [ "$$(id -u)" = 0 ] && [ -z "$$KEYVAULT_TEST_NO_SSHD_SETUP" ]; then \
	    bash tests/sshd/setup.sh --python "$$PWD/$(PY)" --fix-perms >/tmp/keyvault-sshd-setup.log 2>&1 \
	    || { tail -n 30 /tmp/keyvault-sshd-setup.log; exit 1; }; fi
	@# Exit 5 (nothing selected, e.g. PYTEST_ARGS names one file) is not a failure of a part.
	$(PY) -m pytest -n $(TEST_WORKERS) -m 'not sshd' --durations=15 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m sshd --durations=15 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The quick loop: no sshd, no PostgreSQL (SQLite only), no slow tests; slowest listed.
test-fast: venv
	$(PY) -m pytest -m 'not sshd and not postgres and not slow' --durations=15 $(PYTEST_ARGS)

# ruff lint (rule set in pyproject.toml) and formatting, mypy on the package (strict for
# the rotation, ssh and crypto; configuration in pyproject.toml) and the size limits of
# functions and modules (tools/codeshape.py); fails on any finding.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy keyvault keyvault_client tests/support tools
	$(PY) tools/codeshape.py keyvault
	$(PY) tools/codeshape.py keyvault_client

bench: venv
	$(PY) bench/rotation.py

# Long fault loops over the real sshd (docs/rotation.md, "Fault loops"); as root, after `make test`
# set the sshd up. E.g. FAULTLOOP_ARGS='--backend postgres --faults db --rounds 200 --seed 7'.
FAULTLOOP_ARGS ?= --backend sqlite --faults kill9 --rounds 200
faultloop: venv
	PYTHONPATH=$$PWD $(PY) -m tests.support.faultloop $(FAULTLOOP_ARGS)

clean:
	rm -rf $(VENV) .kv-demo
