# Two entry points for a new user: `make paper` and `make test`.
PYTHON ?= python3
STAMP := var/.deps-installed
TEST_STAMP := var/.test-deps-installed

.PHONY: paper test lint deps

$(STAMP): pyproject.toml
	mkdir -p var
	# torch first: 2.13.0 is the local CPU build; anything else would pull CUDA wheels.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Headless Chromium renders report.html in a test; Debian's package, where apt is available.
$(TEST_STAMP): $(STAMP)
	command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $(TEST_STAMP)

deps: $(STAMP)

paper: $(STAMP)
	$(PYTHON) main.py --mode paper $(ARGS)

test: $(TEST_STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check .
