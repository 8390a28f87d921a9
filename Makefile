# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing
# and install what they need; the second run skips the install (stamp file keyed on pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# torch==2.13.0 (CPU build) lies in /opt/wheels on these machines; elsewhere pip finds it on PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: install demo test test-demo test-long test-fast chromium ui-screenshot bench speed guidance-cost bench-all samplers-table quality-table clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[test,eval,ui]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

# The quick `make demo` and its page in headless chromium (a few minutes)
test-demo: $(STAMP) chromium
	$(BIN)/python -m pytest -q -m demo tests/test_bundled.py

# What `make test` leaves out for time: the quick demo and checks of several minutes (markers demo, long); CI runs it
test-long: $(STAMP) chromium
	$(BIN)/python -m pytest -q --durations=10 -m "demo or long" $(PYTEST_ARGS)

# The browser test (tests/test_ui.py) drives Debian's chromium: installed here as root when missing; otherwise
# that one test is skipped and says why.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "make: chromium could not be installed: the browser test will be skipped"; \
	  else echo "make: no /usr/bin/chromium (install it as root: apt-get install chromium): the browser test will be skipped"; fi; \
	fi

# docs/ui.png, the README's picture of `ddpmkit serve`, taken by the browser test (on the bundled emoji32 where installed)
ui-screenshot: $(STAMP) chromium
	DDPMKIT_UI_MODEL=emoji32 DDPMKIT_UI_SCREENSHOT=docs/ui.png $(BIN)/python -m pytest -q tests/test_ui.py -k browser

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not demo and not long" $(PYTEST_ARGS)

# Issue 9's speed benchmark (about 15 minutes on 2 cores): benchmarks/results/speed.{md,json}
bench speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py

guidance-cost: $(STAMP)
	$(BIN)/python benchmarks/guidance_cost.py

bench-all: bench guidance-cost samplers-table

samplers-table: $(STAMP)
	$(BIN)/python benchmarks/samplers_table.py

# FID vs model calls per sampler on the bundled model (docs/samplers.md). Resumable; ddpm-1000 is hours on a CPU:
# run it in the background, or sample the rows on a GPU (QUALITY_ARGS="--device cuda", or there
# "--samples DIR --sample_only" and here "--samples DIR" when the GPU machine has no Inception weights).
QUALITY_ARGS ?=
quality-table: $(STAMP)
	$(BIN)/python benchmarks/quality_per_step.py $(QUALITY_ARGS)

clean:
	rm -rf demo-output .pytest_cache test-artifacts
