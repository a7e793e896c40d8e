# Two commands for a new user: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PY := $(BIN)/python

.PHONY: install test test-fast lint demo bench e2e postgres browser clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

postgres: install
	@scripts/ensure-postgres.sh

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads one).
browser:
	@scripts/ensure-chromium.sh

# The whole suite, on real PostgreSQL (started if none is running), in two worker
# processes: much of it waits on subprocesses, the database and the emulators. Each
# worker has its own scratch database; a module runs whole on one worker, and the
# emulator tests all on one (tests/conftest.py). terraform-check has run the two
# terraform test files already.
TEST_WORKERS ?= 2

test: install postgres browser terraform-check
	TEST_DATABASE_URL="$$(cat .tmp/test-database-url)" $(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup \
		--ignore=tests/test_terraform.py --ignore=tests/test_terraform_ui.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: install
	$(BIN)/python -m orchestrator.demo

bench: install postgres
	TEST_DATABASE_URL="$$(cat .tmp/test-database-url)" $(BIN)/python -m bench

clean:
	rm -rf .orchestrator .tmp .pytest_cache .mypy_cache .ruff_cache

# Offline checks of terraform/: the wiring test plus checkov (0 failed checks).
CHECKOV_VENV ?= .venv-checkov

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==3.3.30'
	touch $@

.PHONY: terraform-check
terraform-check: install $(CHECKOV_VENV)/.installed
	$(BIN)/pytest -q tests/test_terraform.py tests/test_terraform_ui.py
	$(CHECKOV_VENV)/bin/checkov -d terraform --quiet --compact --skip-download

# The storage and BigQuery emulators live in their own virtualenvs (pinned DuckDB).
.PHONY: emulators-venv
emulators-venv:
	bash scripts/emulators-venv.sh all

# The production path on one machine: Postgres, Pub/Sub, GCS and BigQuery emulators.
.PHONY: e2e
e2e: install postgres
	TEST_DATABASE_URL="$$(cat .tmp/test-database-url)" $(BIN)/pytest -q -m emulator

# The deployment rehearsed from terraform itself: the function source installed as the
# buildpack installs it, the deployment job, the four functions, terraform's topics,
# subscriptions, buckets and datasets on the emulators (tests/test_rehearsal.py).
.PHONY: rehearse
rehearse: install postgres
	TEST_DATABASE_URL="$$(cat .tmp/test-database-url)" $(BIN)/pytest -q tests/test_rehearsal.py

# The function source archive exactly as terraform builds it (terraform/.build/).
.PHONY: function-source
function-source: install
	$(BIN)/python -m scripts.deployment archive
