# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing
# and install what they need; the second run skips the install (stamp file keyed on pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# torch==2.13.0 (CPU build) lies in /opt/wheels on these machines; elsewhere pip finds it on PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench speed samplers-table quality-table clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e '.[test,eval]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/guidance_cost.py
	$(BIN)/python benchmarks/samplers_table.py

speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py

samplers-table: $(STAMP)
	$(BIN)/python benchmarks/samplers_table.py

# FID vs model calls per sampler on the bundled model (docs/samplers.md). Resumable; ddpm-1000 is hours on a CPU:
# run it in the background, or on a GPU with QUALITY_ARGS="--device cuda".
QUALITY_ARGS ?=
quality-table: $(STAMP)
	$(BIN)/python benchmarks/quality_per_step.py $(QUALITY_ARGS)

clean:
	rm -rf demo-output .pytest_cache
