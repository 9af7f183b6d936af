# Two entry points for a new user: `make paper` and `make test`.
PYTHON ?= python3
STAMP := var/.deps-installed

.PHONY: paper test lint deps

$(STAMP): pyproject.toml
	mkdir -p var
	# torch first: 2.13.0 is the local CPU build; anything else would pull CUDA wheels.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

paper: $(STAMP)
	$(PYTHON) main.py --mode paper $(ARGS)

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check .
