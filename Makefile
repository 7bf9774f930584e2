PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= examples/config.toml

.PHONY: venv run test bench clean

venv: $(VENV)/.installed runner/ar-exec

# the plugin exec helper (optional: without it runners fork to start plugins, which costs more)
runner/ar-exec: runner/ar_exec.c
	$(CC) -O2 -Wall -Wextra -o $@ $< || echo "warning: could not build runner/ar-exec; runners will fork"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: venv
	$(VENV)/bin/assessment-runtime run --config $(CONFIG)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) examples/state build *.egg-info runner/ar-exec
