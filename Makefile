# The two README commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3

.PHONY: install system-deps demo test

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[test]'

system-deps:
	bash deploy/install-system-deps.sh

demo: install
	ian-node demo

test: install system-deps
	$(PYTHON) -m pytest
