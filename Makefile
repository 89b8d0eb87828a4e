# The two commands of the README's quick start. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-dev
# The horizontal-scale test runs Debian's nginx as the load balancer; CI is a fresh Debian machine, as root.
NGINX := $(or $(shell command -v nginx 2>/dev/null),/usr/sbin/nginx)

.PHONY: run test soak lint audit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

$(NGINX):
	@echo "installing Debian's nginx for the horizontal-scale test (needs root)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx

run: $(STAMP_RUN)
	$(BIN)/vit-serve serve

test: $(STAMP_TEST) $(NGINX)
	$(BIN)/ruff check app tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# 20,000 mixed requests against a real server: memory, file descriptors and threads must stay flat (a few minutes).
soak: $(STAMP_TEST)
	$(BIN)/python -m pytest -q -s -m soak

lint: $(STAMP_TEST)
	$(BIN)/ruff check app tests
	$(BIN)/ruff format --check app tests
	$(BIN)/mypy

# Known vulnerabilities in the installed dependencies (needs PyPI's JSON API or OSV on the network).
audit: $(STAMP_TEST)
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --skip-editable --strict

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
