# consent-flow: `make demo` runs the end-to-end demo, `make test` runs the whole suite.
# Both set up what they need first: a virtualenv, the local OpenID provider's npm packages,
# and the Debian packages redis-server and chromium when they are missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
STAMP  := $(VENV)/.installed
MCP1   := .venv-mcp1
MCP1_STAMP := $(MCP1)/.installed
NODE_STAMP := examples/provider/node_modules/.installed

.PHONY: demo test setup system lint typecheck clean

demo: setup
	$(BIN)/python examples/demo.py

test: setup $(MCP1_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest
	# The MCP integration again on the 1.x SDK (FastMCP), which many servers still run.
	$(MCP1)/bin/python -m pytest tests/test_mcp.py

setup: $(STAMP) $(NODE_STAMP) system

$(MCP1_STAMP): pyproject.toml
	$(PYTHON) -m venv $(MCP1)
	$(MCP1)/bin/pip install --quiet --upgrade pip
	$(MCP1)/bin/pip install --quiet -e '.[dev]' 'mcp<2'
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(NODE_STAMP): examples/provider/package-lock.json
	@command -v node >/dev/null || { echo "Node.js (>= 20.18) is required for the local OpenID provider" >&2; exit 1; }
	npm ci --prefix examples/provider --no-audit --no-fund --loglevel=error
	touch $@

# The tests need a redis-server binary and a headless Chromium; CI must fail, not skip, without them.
system:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV) $(MCP1) examples/provider/node_modules .pytest_cache .mypy_cache .ruff_cache
