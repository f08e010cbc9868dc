# The two README commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3

.PHONY: install system-deps demo test

# The nnunet extra (nnunetv2) so that `make test` runs nnU-Net's rows end to end (tests/training/test_nnunet.py).
install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[test,nnunet]'

system-deps:
	bash deploy/install-system-deps.sh

demo: install
	ian-node demo

# The data flows one way (import-linter contracts in pyproject.toml) and ruff stays clean, or the run fails.
test: install system-deps
	$(PYTHON) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest
