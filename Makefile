PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)
# The lock files (*.txt) are compiled from the hand-edited lists (*.in): `make lock` after editing one.
UV_COMPILE := $(VENV)/bin/uv pip compile --quiet --universal --generate-hashes --python-version 3.11

.PHONY: install install-cdc lock run test bench chaos chaos-cluster chaos-compare clean

$(STAMP): requirements.txt requirements-dev.txt
	scripts/system-deps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# relay_cdc's extras (README "The CDC relay"): Debezium's engine from its lock, a Java runtime for it and MariaDB's
# JDBC driver (Debian). `make test` runs the CDC tests, so it installs them; `make run` does without.
CDC_STAMP := $(VENV)/.installed-cdc-$(shell cat requirements-cdc.txt | sha1sum | cut -c1-12)
$(CDC_STAMP): $(STAMP) requirements-cdc.txt
	test -f /usr/share/java/mariadb-java-client.jar || scripts/system-deps libmariadb-java
	scripts/java-for-cdc
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements-cdc.txt
	rm -f $(VENV)/.installed-cdc-*
	touch $@

install-cdc: $(CDC_STAMP)

lock: install
	$(UV_COMPILE) requirements.in -o requirements.txt
	$(UV_COMPILE) requirements-dev.in -o requirements-dev.txt
	$(UV_COMPILE) requirements-bench.in -o requirements-bench.txt
	$(UV_COMPILE) requirements-cdc.in -o requirements-cdc.txt

run: install
	scripts/run-dev

# The AsyncAPI parser that validates docs/asyncapi.yaml (tests/test_asyncapi.py), from its lock file.
ASYNCAPI_TOOLS := scripts/asyncapi/node_modules/.installed
$(ASYNCAPI_TOOLS): scripts/asyncapi/package-lock.json
	command -v npm >/dev/null || scripts/system-deps nodejs npm
	npm ci --prefix scripts/asyncapi --no-audit --no-fund --silent
	touch $@

test: install install-cdc $(ASYNCAPI_TOOLS)
	command -v promtool >/dev/null || scripts/system-deps prometheus  # promtool checks deploy/prometheus
	command -v chromedriver >/dev/null || scripts/system-deps chromium chromium-driver  # the admin's browser tests
	scripts/test $(TEST_ARGS)

# The lock, shared: the suite's database-restart tests (scripts/test) wait for the benchmarks, and the other way round.
bench: install install-cdc
	$(VENV)/bin/pip install --quiet --require-hashes -r requirements-bench.txt
	command -v wrk >/dev/null || scripts/system-deps wrk
	PYTHONPATH=. flock --shared /tmp/orders-outbox-mariadb-restart.lock $(VENV)/bin/python -m bench.run $(BENCH_ARGS)
	PYTHONPATH=. $(VENV)/bin/python -m bench.cdc $(BENCH_CDC_ARGS)  # relay_cdc beside the relay: docs/benchmarks-cdc.md

chaos: install install-cdc
	PYTHONPATH=. $(VENV)/bin/python -m chaos.run $(CHAOS_ARGS)

# Against a mock cluster of three brokers: leader moves, a broker down, injected produce and consumer errors, fatal
# idempotence errors and a three-minute outage of every broker, with the relay's default settings.
chaos-cluster: install
	PYTHONPATH=. $(VENV)/bin/python -m chaos.run --cluster $(CHAOS_ARGS)

# The direct publish the outbox replaces (acks=1, then acks=all), and the outbox, under the same faults.
chaos-compare: install install-cdc
	PYTHONPATH=. $(VENV)/bin/python -m chaos.run --compare --quick $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .run staticfiles
