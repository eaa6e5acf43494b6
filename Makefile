# One-command set-up: every target builds .venv/ from requirements.txt when it
# is missing or older than that file or pyproject.toml, then installs this
# checkout into it (editable: `python train.py`, `python tools/<name>.py` and
# the shapemask-* commands run the checkout's code).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

# Test processes (pytest-xdist): most tests keep one core busy, so two
# workers on a 2-core machine nearly halve the wall time. Each test module
# runs whole in one worker (its fixtures are built once), long ones first.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

demo: $(STAMP)
	$(PY) tools/demo.py --output_dir demo_out

clean:
	rm -rf demo_out runs out .pytest_cache build dist
