PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)

.PHONY: install run test bench chaos clean

$(STAMP): requirements.txt requirements-dev.txt
	scripts/system-deps
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: install
	scripts/run-dev

test: install
	scripts/test

bench: install
	$(VENV)/bin/pip install --quiet -r requirements-bench.txt
	command -v wrk >/dev/null || scripts/system-deps wrk
	PYTHONPATH=. $(VENV)/bin/python -m bench.run $(BENCH_ARGS)

chaos: install
	PYTHONPATH=. $(VENV)/bin/python -m chaos.run $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .run staticfiles
