# The two commands of the README's quick start. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-dev
# The horizontal-scale test runs Debian's nginx as the load balancer; CI is a fresh Debian machine, as root.
NGINX := $(or $(shell command -v nginx 2>/dev/null),/usr/sbin/nginx)
# The demo page's end-to-end test drives Debian's chromium through Playwright (executable_path: no browser download).
CHROMIUM := $(or $(shell command -v chromium 2>/dev/null),/usr/bin/chromium)
# The Spark batch test runs on Debian's Java runtime (OpenJDK 17 on Debian 12; Spark 4 needs 17 or later).
JAVA := $(or $(shell command -v java 2>/dev/null),/usr/bin/java)
# The benchmark's load generator, Debian's wrk.
WRK := $(or $(shell command -v wrk 2>/dev/null),/usr/bin/wrk)
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: run test soak bench lint audit docs clean image image-test

# PyPI's torch for Linux x86_64 is the CUDA build: of a 5.4 GiB venv, 4.0 GiB are CUDA libraries and triton
# (measured: bench/results/2026-12-01-first-answer-amd-epyc-2core.md). A machine without a GPU can install PyTorch's
# CPU build first: `make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX_URL ?=

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX_URL) torch torchvision)

$(STAMP_RUN): pyproject.toml setup.py $(wildcard app/grpc/proto/*.proto) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml setup.py $(wildcard app/grpc/proto/*.proto) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

$(STAMP_BENCH): $(STAMP_TEST)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

$(WRK):
	@echo "installing Debian's wrk for the benchmark (needs root)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk

$(NGINX):
	@echo "installing Debian's nginx for the horizontal-scale test (needs root)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx

$(CHROMIUM):
	@echo "installing Debian's chromium for the demo page's browser test (needs root)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

$(JAVA):
	@echo "installing Debian's Java runtime for the Spark batch test (needs root)"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends default-jre-headless

run: $(STAMP_RUN)
	$(BIN)/vit-serve serve

test: $(STAMP_TEST) $(NGINX) $(CHROMIUM) $(JAVA)
	$(BIN)/ruff check app clients tests bench docs/hooks
	$(BIN)/ruff format --check app clients tests bench docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$site; \
	  status=$$?; rm -rf $$site; exit $$status
	$(BIN)/python -m pytest -q

# 20,000 mixed requests against a real server: memory, file descriptors and threads must stay flat (a few minutes).
soak: $(STAMP_TEST)
	$(BIN)/python -m pytest -q -s -m soak

# The benchmark matrix against vit-serve, the baseline and the offline limit, measured in one sitting (~15 min):
# bench/results/<date>-<machine>.{md,json,png}. BENCH_ARGS="--quick" for a 3-minute smoke run. Then the offline rows
# (`vit-serve batch` local and Ray against the offline limit and predict -> server, ~5 min): BATCH_BENCH_ARGS.
# Then the backends (torch, onnxruntime, openvino, bf16, int8: each one's offline limit and the service on it, against
# torch in the same sitting, bench/results/<date>-backends-<machine>.{md,json}): BACKENDS_BENCH_ARGS.
bench: $(STAMP_BENCH) $(WRK)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/batch.py $(BATCH_BENCH_ARGS)
	$(BIN)/python bench/protocols.py $(PROTOCOLS_BENCH_ARGS)
	$(BIN)/python bench/backends.py $(BACKENDS_BENCH_ARGS)

# The container image from the Dockerfile, with Docker where its daemon answers, else with buildah (installed when
# missing), on a Debian base made once with debootstrap where no registry can be reached (cached in
# ~/.cache/vit-serve): tests/support/container_image.py. Build arguments as KEY=VALUE words, e.g. offline:
# `make image IMAGE_BUILD_ARGS="BAKE_WEIGHTS="`. Docs: docs/deployment/container.md.
IMAGE_BUILD_ARGS ?=
image:
	$(PYTHON) -m tests.support.container_image build $(foreach arg,$(IMAGE_BUILD_ARGS),--build-arg $(arg))

# Builds the image where needed (the layer cache makes an unchanged one quick), starts the server from it and checks
# it: tests/deployment/test_image.py, kept out of `make test` (5 minutes from nothing, 1 when cached); .ci/run runs it.
image-test: $(STAMP_TEST)
	VIT_IMAGE_BUILD_ARGS="$(IMAGE_BUILD_ARGS)" $(BIN)/python -m pytest -q -m image tests/deployment/test_image.py

lint: $(STAMP_TEST)
	$(BIN)/ruff check app clients tests bench docs/hooks
	$(BIN)/ruff format --check app clients tests bench docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports

# Known vulnerabilities in the installed dependencies (needs PyPI's JSON API or OSV on the network).
audit: $(STAMP_TEST)
	$(BIN)/python -m pip install --quiet pip-audit
	$(BIN)/pip-audit --skip-editable --strict

# The documentation site (docs/, mkdocs-material) with live reload, on a port beside the service's 8000 and 8001.
docs: $(STAMP_TEST)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8002

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
