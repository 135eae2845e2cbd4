# The two commands of the quick start, plus helpers. Each target sets up its own venv.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# CPU torch first, from local disk; a bare `torch` requirement would pull a CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sponge demo

# Two workers, each test file whole on one of them (each starts its own broker): the suite waits on
# brokers, services and subprocesses more than it computes, so two at once halve its time.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/python bench/ingest.py
	$(VENV)/bin/python bench/selector.py
	$(VENV)/bin/python bench/sample_efficiency.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
