# reals: every target is safe to re-run; finished artifacts are reused.
VENV   ?= .venv
PY     := $(VENV)/bin/python
REALS  := $(VENV)/bin/reals
DEVICE ?= auto
export REALS_HOME ?= $(HOME)/.cache/reals
# Tests reuse the assets `make assets` fetched instead of fetching their own copy.
export REALS_TEST_HOME ?= $(REALS_HOME)

.PHONY: install assets test demo bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

assets: install
	$(REALS) assets fetch

test: install assets
	$(VENV)/bin/pytest -q

DEMO := runs/demo

$(DEMO)/data/manifest.json: | install assets
	$(REALS) data fashion-mnist $(DEMO)/data --size 64

demo: $(DEMO)/data/manifest.json

bench: install assets
	$(PY) -m reals_cli.bench --out docs/benchmarks.md

clean-demo:
	rm -rf $(DEMO)
