# make demo | make test | make ui -- each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export ATTRIBUTION_STORAGE ?= $(CURDIR)/.storage
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint ui bench clean screenshots

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,k8s,postgres,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attribution demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Test files run in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one process).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The UI pictures in docs/img, re-taken by the browser test (tests/ui; needs Debian's chromium).
screenshots: $(STAMP)
	ATTRIBUTION_SCREENSHOTS=$(CURDIR)/docs/img $(PY) -m pytest -q -p no:cacheprovider tests/ui

ui: $(STAMP)
	$(PY) -c "from attribution_assets.defs.instance import persistent_instance; persistent_instance()"
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean:
	rm -rf .dagster_home .storage .pytest_cache
